// The Python module of the CUDA harness (built by tests/cuda_harness.py, never part of the wheel):
// the four CUDA ops' host entry points - the very launchers and kernels of csrc/cuda/*.cuh, on
// the shim - taking CPU tensors, the shim's controls and statistics, and small kernels that test
// the shim itself (tests/test_cuda_harness.py).

#include <torch/extension.h>

#include <string>

#include "../../common.h"
#include "../entry_points.h"
#include "../paths_python.h"
#include "../runtime.cuh"

#ifndef DYNNET_HARNESS_FLAVOR
#define DYNNET_HARNESS_FLAVOR "plain"
#endif

// The harness's own count of its CUDA entry points' calls (what ops.cpp counts in the extension),
// read by kernel_calls(): the harness runs the CUDA ops' host code, which counts as CUDA.
namespace dynnet {
namespace {
std::array<int64_t, kNumKernelOps> harness_calls{};
}  // namespace

void count_kernel_call(KernelOp op, c10::DeviceType) { ++harness_calls[static_cast<size_t>(op)]; }
}  // namespace dynnet

namespace dynnet::selftest {

// Each thread writes its built-ins: threadIdx, blockIdx, blockDim, gridDim (12 values).
__global__ void builtins_kernel(int64_t* out) {
  const int64_t threads = blockDim.x * blockDim.y * blockDim.z;
  const int64_t t = threadIdx.x + blockDim.x * (threadIdx.y + int64_t{blockDim.y} * threadIdx.z);
  const int64_t b = blockIdx.x + gridDim.x * (blockIdx.y + int64_t{gridDim.y} * blockIdx.z);
  int64_t* o = out + (b * threads + t) * 12;
  const unsigned v[12] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                          blockDim.x,  blockDim.y,  blockDim.z,  gridDim.x,  gridDim.y,  gridDim.z};
  for (int i = 0; i < 12; ++i) o[i] = v[i];
}

// `rounds` times: every thread publishes its value in shared memory and takes its right
// neighbour's. Correct only if __syncthreads() really holds every thread until all have written.
__global__ void rotate_kernel(float* out, int rounds) {
  __shared__ float s[1024];
  const unsigned n = blockDim.x, t = threadIdx.x;
  float v = static_cast<float>(t + 1000 * blockIdx.x);
  for (int r = 0; r < rounds; ++r) {
    s[t] = v;
    __syncthreads();
    v = s[(t + 1) % n];
    __syncthreads();
  }
  out[blockIdx.x * n + t] = v;
}

// Block b writes s[t] for t < n - b only, then every thread reads s[t]: the rest must read NaN,
// not what an earlier block (or launch) left there.
__global__ void unwritten_shared_kernel(float* out) {
  __shared__ float s[1024];
  const unsigned n = blockDim.x, t = threadIdx.x;
  if (t < n - blockIdx.x) s[t] = static_cast<float>(blockIdx.x);
  __syncthreads();
  out[blockIdx.x * n + t] = s[t];
}

// Dynamic shared memory of `count` floats: all but the last written, then all read.
__global__ void dynamic_smem_kernel(float* out, int count) {
  float* s = dynamic_smem<float>();
  for (int i = threadIdx.x; i + 1 < count; i += blockDim.x) s[i] = static_cast<float>(i);
  __syncthreads();
  for (int i = threadIdx.x; i < count; i += blockDim.x) out[i] = s[i];
}

// Threads below `split` wait at one barrier, the others at another: an error unless split is 0
// or the block size.
__global__ void divergent_barrier_kernel(float* out, unsigned split) {
  if (threadIdx.x < split) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Threads from `live` on return at once; the others still synchronise through shared memory.
__global__ void early_return_kernel(float* out, unsigned live) {
  __shared__ float s[1024];
  const unsigned t = threadIdx.x;
  if (t >= live) return;
  s[t] = static_cast<float>(t);
  __syncthreads();
  out[t] = s[(t + 1) % live];
}

// A race by design: every thread of every block writes out[0] (and s[0]), unsynchronised. The
// result is the schedule's last writer: it changes when the schedule order does.
__global__ void racy_kernel(float* out) {
  __shared__ float s[1];
  s[0] = static_cast<float>(threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = s[0];
  out[gridDim.x] = static_cast<float>(blockIdx.x);
}

// Warp operations, each thread writing 6 results; the last warp may be partial (its mask then
// names the lanes it has). v = thread index + 1.
__global__ void warp_kernel(int64_t* out) {
  const unsigned t = threadIdx.x, lane = t % 32, left = blockDim.x - t / 32 * 32, have = left < 32 ? left : 32;
  const unsigned mask = have == 32 ? 0xFFFFFFFFu : (1u << have) - 1;
  const int v = static_cast<int>(t) + 1;
  int sum = v;
  for (int offset = 16; offset > 0; offset /= 2) {
    if (offset < static_cast<int>(have)) sum += __shfl_xor_sync(mask, sum, offset);
  }
  __syncwarp(mask);
  int64_t* o = out + t * 6;
  o[0] = have == 32 ? sum : -1;  // the butterfly sums a whole warp only
  o[1] = __shfl_sync(mask, v, 3 % have);
  o[2] = __shfl_up_sync(mask, v, 1);
  o[3] = __shfl_down_sync(mask, v, 2, 8);
  o[4] = __ballot_sync(mask, lane % 3 == 0);
  o[5] = __any_sync(mask, lane == 5) + 2 * __all_sync(mask, v > 0);
}

// Warp operations misused: 0, half the lanes shuffle while the others return; 1, while the others
// wait at __syncthreads(); 2, a shuffle reads a lane outside its mask.
__global__ void warp_misuse_kernel(int64_t* out, int mode) {
  const unsigned t = threadIdx.x;
  if (mode == 0 && t >= 16) return;
  if (mode == 1 && t >= 16) {
    __syncthreads();
    return;
  }
  if (mode == 2 && t >= 16) return;
  out[t] = __shfl_sync(mode == 2 ? 0xFFFFu : 0xFFFFFFFFu, static_cast<int>(t), mode == 2 ? 20 : 0);
}

// Launches nothing but the configuration; kId keeps the opt-in state of tests apart.
template <int kId>
__global__ void empty_kernel() {}

}  // namespace dynnet::selftest

namespace {

using dynnet::launch;
namespace st = dynnet::selftest;

dim3 to_dim3(const std::vector<int64_t>& d) {
  TORCH_CHECK(d.size() == 3, "selftest: dimensions must be [x, y, z]");
  return dim3(static_cast<unsigned>(d[0]), static_cast<unsigned>(d[1]), static_cast<unsigned>(d[2]));
}

at::Tensor floats(int64_t n) { return dynnet::new_output({n}, at::kFloat); }

void bind_selftests(pybind11::module_& m) {
  m.def("builtins", [](std::vector<int64_t> grid, std::vector<int64_t> block) {
    const dim3 g = to_dim3(grid), b = to_dim3(block);
    at::Tensor out = at::full({int64_t{g.x} * g.y * g.z * b.x * b.y * b.z, 12}, -1, at::kLong);
    launch<st::builtins_kernel>(g, b, 0, out.data_ptr<int64_t>());
    return out;
  });
  m.def("rotate", [](int64_t blocks, int64_t threads, int rounds) {
    at::Tensor out = floats(blocks * threads);
    launch<st::rotate_kernel>(dim3(blocks), dim3(threads), 0, out.data_ptr<float>(), rounds);
    return out;
  });
  m.def("unwritten_shared", [](int64_t blocks, int64_t threads) {
    at::Tensor out = floats(blocks * threads);
    launch<st::unwritten_shared_kernel>(dim3(blocks), dim3(threads), 0, out.data_ptr<float>());
    return out;
  });
  m.def("dynamic_smem", [](int count, bool opt_in) {
    at::Tensor out = floats(count);
    const size_t bytes = count * sizeof(float);
    if (opt_in) dynnet::allow_dynamic_smem<st::dynamic_smem_kernel>(bytes);
    launch<st::dynamic_smem_kernel>(dim3(1), dim3(128), bytes, out.data_ptr<float>(), count);
    return out;
  });
  m.def("divergent_barrier", [](int64_t threads, int64_t split) {
    at::Tensor out = floats(threads);
    launch<st::divergent_barrier_kernel>(dim3(1), dim3(threads), 0, out.data_ptr<float>(),
                                         static_cast<unsigned>(split));
    return out;
  });
  m.def("early_return", [](int64_t threads, int64_t live) {
    at::Tensor out = floats(threads);
    launch<st::early_return_kernel>(dim3(1), dim3(threads), 0, out.data_ptr<float>(), static_cast<unsigned>(live));
    return out;
  });
  m.def("warp", [](int64_t threads) {
    at::Tensor out = at::full({threads, 6}, -2, at::kLong);
    launch<st::warp_kernel>(dim3(1), dim3(threads), 0, out.data_ptr<int64_t>());
    return out;
  });
  m.def("warp_misuse", [](int mode) {
    at::Tensor out = at::full({32}, -2, at::kLong);
    launch<st::warp_misuse_kernel>(dim3(1), dim3(32), 0, out.data_ptr<int64_t>(), mode);
    return out;
  });
  m.def("racy", [](int64_t blocks, int64_t threads) {
    at::Tensor out = floats(blocks + 1);
    launch<st::racy_kernel>(dim3(blocks), dim3(threads), 0, out.data_ptr<float>());
    return out;
  });
  m.def("empty_launch", [](std::vector<int64_t> grid, std::vector<int64_t> block, int64_t smem, int64_t opt_in) {
    // Kernel 0 never opts in; kernel 1 opts in to opt_in bytes first (when > 0).
    if (opt_in > 0) {
      dynnet::allow_dynamic_smem<st::empty_kernel<1>>(opt_in);
      launch<st::empty_kernel<1>>(to_dim3(grid), to_dim3(block), smem);
    } else {
      launch<st::empty_kernel<0>>(to_dim3(grid), to_dim3(block), smem);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace h = dynnet::harness;
  m.doc() = "The CUDA kernels of dynnet_ext run on the CPU (tests only; see csrc/cuda/harness/shim.h)";
  m.def("linear_relu", [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const std::string& activation) { return dynnet::linear_relu_cuda(x, weight, bias, activation); });
  m.def("linear_act", [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const std::string& activation) { return dynnet::linear_act_cuda(x, weight, bias, activation); });
  m.def("linear_relu_backward",
        [](const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& y,
           const std::string& activation, std::array<bool, 3> mask) {
          return dynnet::linear_relu_backward_cuda(grad_y, x, weight, y, activation, mask);
        });
  m.def("dynamic_net", &dynnet::dynamic_net_cuda);
  m.def("dynamic_net_backward", &dynnet::dynamic_net_backward_cuda);
  m.def("set_schedule", [](const std::string& order) {
    TORCH_CHECK(order == "forward" || order == "reverse", "schedule must be 'forward' or 'reverse', got '", order, "'");
    h::set_schedule(order == "forward" ? h::Schedule::Forward : h::Schedule::Reverse);
  });
  m.def("kernel_stats", [] {
    pybind11::dict out;
    for (const auto& [name, s] : h::kernel_stats()) {
      pybind11::dict d;
      d["launches"] = s.launches, d["blocks"] = s.blocks, d["threads"] = s.threads, d["barriers"] = s.barriers;
      out[pybind11::str(name)] = d;
    }
    return out;
  });
  m.def("reset_kernel_stats", &h::reset_kernel_stats);
  m.def("kernel_calls", [] {
    pybind11::dict calls;
    for (size_t op = 0; op < dynnet::kNumKernelOps; ++op) {
      calls[dynnet::kKernelOpNames[op]] = dynnet::harness_calls[op];
    }
    return calls;
  });
  m.def("set_planted_bug", [](int id) { h::planted_bug = id; });
  // The dispatch rule's state of the harness's own copy of the launchers.
  dynnet::paths::bind(m);
  m.def("vendor_log", [] {
    pybind11::list out;
    for (const auto& r : dynnet::vendor_log()) {
      pybind11::dict d;
      d["m"] = r.m, d["n"] = r.n, d["k"] = r.k, d["lda"] = r.lda, d["ldb"] = r.ldb, d["ldc"] = r.ldc;
      d["trans_a"] = r.trans_a, d["trans_b"] = r.trans_b, d["epilogue"] = r.epilogue, d["dtype"] = r.dtype;
      d["lt_epilogue"] = r.lt_epilogue;
      out.append(d);
    }
    return out;
  }, "the vendor GEMMs run since the last clear_vendor_log(): what each asked of cuBLAS");
  m.def("clear_vendor_log", [] { dynnet::vendor_log().clear(); });
  m.def("build_info", [] {
    pybind11::dict info;
    info["flavor"] = std::string(DYNNET_HARNESS_FLAVOR);
    return info;
  });
  auto selftest = m.def_submodule("selftest", "kernels that test the shim itself");
  bind_selftests(selftest);
}
