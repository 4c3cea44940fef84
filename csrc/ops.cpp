// The op schemas of the `dynnet` namespace - the one place ops are declared - and the Python
// module `dynnet_ext._C`, whose only job is to be importable (loading it registers the ops and
// kernels) and to say what was compiled.
//
// linear_relu(x, weight, bias, activation) -> y
//   y = act(x @ weight.T + bias), x: (*, in), weight: (out, in), bias: (out,) or None,
//   activation: 'relu', 'gelu' (exact, erf), 'gelu_tanh' (tanh approximation), 'silu' or 'none'.
//   y: (*, out), a new contiguous tensor. Its autograd node saves x, weight and, for 'relu', y;
//   for a smooth activation it runs linear_act instead and saves z.
// linear_act(x, weight, bias, activation) -> (y, z)
//   The smooth activations ('gelu', 'gelu_tanh', 'silu') only: y as linear_relu's and the
//   pre-activation z = x @ weight.T + bias, which their backward needs. Not differentiable itself:
//   linear_relu's autograd node calls it.
// linear_relu_backward(grad_y, x, weight, y, activation, output_mask) -> (grad_x, grad_weight, grad_bias)
//   With g = (y <= 0 ? 0 : grad_y) for 'relu' (the mask comes from the saved output and treats
//   NaN exactly as threshold_backward does), g = grad_y * act'(y) for a smooth activation, whose
//   y argument is the pre-activation z, and g = grad_y for 'none' (y may be None):
//   grad_x = g @ weight, grad_weight = g.T @ x,
//   grad_bias = g.sum over leading dims. A gradient whose output_mask entry is false is not
//   computed and is returned as an empty tensor of shape (0,).
//
// dynamic_net(x, w_in, b_in, w_h, b_h, w_out, b_out, depth) -> (out, acts)
//   The whole DynamicNet: h = relu(x @ w_in.T + b_in), then depth times h = relu(h @ w_h.T + b_h)
//   (one shared hidden layer), out = h @ w_out.T + b_out. x: (*, D_in), w_in: (H, D_in),
//   w_h: (H, H), w_out: (D_out, H), biases 1-d. w_h and b_h may be None at depth 0. out: (*, D_out);
//   acts: ((depth + 1) * M, H), the post-ReLU activations h_0..h_depth stacked (M = rows of x),
//   which the backward needs.
// dynamic_net_backward(grad_out, x, w_in, w_h, w_out, acts, depth, output_mask)
//     -> (grad_x, grad_w_in, grad_b_in, grad_w_h, grad_b_h, grad_w_out, grad_b_out)
//   All gradients of dynamic_net; the shared layer's summed over its depth uses (zeros at depth 0).
//   output_mask and empty (0,) tensors as for linear_relu_backward.

#include <torch/extension.h>

#include <array>
#include <atomic>

#include "common.h"
#include "cpu/gemm.h"
#include "cuda/paths_python.h"
#include "dispatch.h"

namespace dynnet {
namespace {

// [0]: CPU kernels, [1]: CUDA kernels.
std::array<std::array<std::atomic<int64_t>, kNumKernelOps>, 2> kernel_call_counts{};

}  // namespace

void count_kernel_call(KernelOp op, c10::DeviceType device) {
  kernel_call_counts[device == c10::DeviceType::CUDA][static_cast<size_t>(op)].fetch_add(1, std::memory_order_relaxed);
}

}  // namespace dynnet

TORCH_LIBRARY(dynnet, m) {
  m.def("linear_relu(Tensor x, Tensor weight, Tensor? bias, str activation='relu') -> Tensor");
  m.def("linear_act(Tensor x, Tensor weight, Tensor? bias, str activation) -> (Tensor, Tensor)");
  m.def(
      "linear_relu_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? y, str activation, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dynamic_net(Tensor x, Tensor w_in, Tensor b_in, Tensor? w_h, Tensor? b_h, Tensor w_out, Tensor b_out, "
      "int depth) -> (Tensor, Tensor)");
  m.def(
      "dynamic_net_backward(Tensor grad_out, Tensor x, Tensor w_in, Tensor? w_h, Tensor w_out, Tensor acts, "
      "int depth, bool[7] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// setup.py defines these; the defaults keep a hand build working.
#ifndef DYNNET_CUDA_ARCHS
#define DYNNET_CUDA_ARCHS ""
#endif
#ifndef DYNNET_TORCH_VERSION
#define DYNNET_TORCH_VERSION "unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "dynnet_ext compiled kernels (loading this module registers torch.ops.dynnet.*)";
  // The eager fast paths to torch.ops.dynnet.linear_relu and dynamic_net: the same dispatcher
  // call (autograd, device kernels, Python modes all apply), without torch.ops' Python-side
  // argument handling, a sizeable part of a small layer's time (benchmarks/results/README.md,
  // thresholds: torch-ops-call).
  // torch.compile traces torch.ops.dynnet.* instead (dynnet_ext.functional picks).
  module.def("linear_relu", &dynnet::call_linear_relu, pybind11::arg("x"), pybind11::arg("weight"),
             pybind11::arg("bias"), pybind11::arg("activation"));
  module.def("dynamic_net", &dynnet::call_dynamic_net, pybind11::arg("x"), pybind11::arg("w_in"),
             pybind11::arg("b_in"), pybind11::arg("w_h"), pybind11::arg("b_h"), pybind11::arg("w_out"),
             pybind11::arg("b_out"), pybind11::arg("depth"));
  module.def("kernel_calls", []() {
    pybind11::dict calls;
    for (const auto& [device, row] : {std::pair{"cpu", 0}, std::pair{"cuda", 1}}) {
      pybind11::dict per_op;
      for (size_t op = 0; op < dynnet::kNumKernelOps; ++op)
        per_op[dynnet::kKernelOpNames[op]] = dynnet::kernel_call_counts[row][op].load(std::memory_order_relaxed);
      calls[device] = per_op;
    }
    return calls;
  });
  // The CPU GEMM engine's instruction set (csrc/cpu/gemm.cpp): tests and benchmarks switch it
  // in-process; DYNNET_EXT_CPU_GEMM sets it at load.
  module.def("cpu_gemm_isa", &dynnet::gemm::isa, "the CPU GEMM engine in use: avx512, avx2 or aten");
  module.def("cpu_gemm_kernels", &dynnet::gemm::kernels_name, pybind11::arg("dtype"),
             "the kernels the CPU ops use now for a dtype name: avx512, avx512_bf16, avx2 or aten");
  module.def("cpu_gemm_isas", &dynnet::gemm::available_isas, "the CPU GEMM engines this CPU and build can run");
  module.def("set_cpu_gemm_isa", &dynnet::gemm::set_isa, pybind11::arg("name"),
             "switch the CPU GEMM engine (auto, avx512, avx2, aten); returns the previous one");
  module.def("set_cpu_gemm_form", &dynnet::gemm::set_form, pybind11::arg("name"),
             "force the engine's dot, packed or direct form on every problem it can run, or auto (the shape "
             "rule); returns the previous setting");
  module.def("cpu_gemm_form_for", &dynnet::gemm::form_for, pybind11::arg("m"), pybind11::arg("n"), pybind11::arg("k"),
             pybind11::arg("dtype") = "float32", pybind11::arg("b_rows") = true,
             "the form that runs C (m, n) = A (m, k) @ B (k, n) now, B with contiguous rows (the backward's "
             "operands) or columns (b_rows=False: the forward's W^T): dot, packed, direct, or aten");
  module.def("cpu_fma_peak_gflops", &dynnet::gemm::fma_peak_gflops, pybind11::arg("isa"), pybind11::arg("threads"),
             pybind11::arg("seconds") = 0.2,
             "GFLOP/s of a register-only FMA loop of the engine's ISA on `threads` threads (per-thread CPU time): the cores' "
             "ceiling; isa='avx512_bf16': the vdpbf16ps loop, bfloat16's ceiling where the CPU has it");
  // The CUDA dispatch rule (csrc/cuda/paths.h): forced path, threshold table, the rule itself.
  // Bound on every build: the rule is plain C++, readable and testable without a GPU.
  dynnet::paths::bind(module);
  module.def("build_info", []() {
    pybind11::dict info;
    info["cpu_kernels"] = true;
#ifdef DYNNET_WITH_CUDA
    info["cuda_kernels"] = true;
#else
    info["cuda_kernels"] = false;
#endif
    info["cuda_archs"] = std::string(DYNNET_CUDA_ARCHS);
    info["torch_version"] = std::string(DYNNET_TORCH_VERSION);  // the torch it was built against
    // The CPU GEMM engine at load (DYNNET_EXT_CPU_GEMM is read, and rejected if wrong, here).
    info["cpu_gemm_isa"] = dynnet::gemm::isa();
    info["cpu_gemm_form"] = dynnet::gemm::form();
    return info;
  });
}
