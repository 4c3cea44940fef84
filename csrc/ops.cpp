// The op schemas of the `dynnet` namespace - the one place ops are declared - and the Python
// module `dynnet_ext._C`, whose only job is to be importable (loading it registers the ops and
// kernels) and to say what was compiled.
//
// linear_relu(x, weight, bias, activation) -> y
//   y = act(x @ weight.T + bias), x: (*, in), weight: (out, in), bias: (out,) or None,
//   activation: 'relu' or 'none'. y: (*, out), a new contiguous tensor.
// linear_relu_backward(grad_y, x, weight, y, activation, output_mask) -> (grad_x, grad_weight, grad_bias)
//   With g = (y <= 0 ? 0 : grad_y) for 'relu' (the mask comes from the saved output and treats
//   NaN exactly as threshold_backward does; y may be None for 'none'): grad_x = g @ weight, grad_weight = g.T @ x,
//   grad_bias = g.sum over leading dims. A gradient whose output_mask entry is false is not
//   computed and is returned as an empty tensor of shape (0,).

#include <torch/extension.h>

#include "common.h"

TORCH_LIBRARY(dynnet, m) {
  m.def("linear_relu(Tensor x, Tensor weight, Tensor? bias, str activation='relu') -> Tensor");
  m.def(
      "linear_relu_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? y, str activation, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
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
  // The eager fast path to torch.ops.dynnet.linear_relu: the same dispatcher call (autograd,
  // device kernels, Python modes all apply), without torch.ops' Python-side argument handling,
  // which costs ~2-3 us a call - a sizeable part of a small layer. torch.compile traces
  // torch.ops.dynnet.linear_relu instead (dynnet_ext.functional picks).
  module.def(
      "linear_relu",
      [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
         const std::string& activation) {
        static auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dynnet::linear_relu", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               c10::string_view)>();
        return op.call(x, weight, bias, activation);
      },
      pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("activation"));
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
    return info;
  });
}
