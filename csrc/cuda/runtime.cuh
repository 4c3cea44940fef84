// The seam between the CUDA kernels and what runs them. The kernels and their host launchers
// (linear_relu.cuh, dynamic_net.cuh) are written once and compiled twice:
//   nvcc, for the GPU (setup.py):    the CUDA runtime, the current stream, CUDAGuard, launch checks;
//   the host compiler with DYNNET_CUDA_HARNESS defined, for the CPU harness that the tests run
//   (harness/shim.h): each block's threads as fibers on one host thread, __syncthreads a barrier
//   of the block, sm_90 launch limits checked, shared memory and outputs NaN-filled.
// Everything a launcher does that differs between the two goes through this header, so the grid
// and shared-memory sizes, the argument set-up and the choice between paths are the same code in
// both builds:
//   launch<kernel>(grid, block, smem_bytes, args...)   the project's only <<< >>>
//   allow_dynamic_smem<kernel>(bytes)                   the opt-in above the default 48 KiB
//   dynamic_smem<T>()                                   (device) the block's dynamic shared memory
//   DeviceScope scope(x, "op")                          x is on this build's device; the device guard
//   new_output(sizes, options)                          output allocation (NaN-filled in the harness)
//   grid_1d(blocks, what)                               a 1-d grid size, checked against the limit
// A new GPU-only facility (another runtime call, a vendor GEMM) belongs here too, with a CPU
// stand-in in harness/shim.h, so that the launcher calling it still runs in the harness.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>

#ifdef DYNNET_CUDA_HARNESS
#include "harness/shim.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace dynnet {

// Dynamic shared memory a kernel gets without opting in, and the most it may opt in to (sm_90).
constexpr size_t kDefaultSmemBytes = 48 * 1024;
constexpr size_t kMaxSmemBytes = 227 * 1024;

#ifndef DYNNET_CUDA_HARNESS

template <auto kKernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  kKernel<<<grid, block, smem_bytes, at::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <auto kKernel>
void set_max_dynamic_smem(size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// The block's dynamic shared memory (the launch's smem_bytes), 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char dynnet_dynamic_smem[];
  return reinterpret_cast<T*>(dynnet_dynamic_smem);
}

// The op's tensors are on a CUDA device (x stands for them: the argument checks have already
// required the others to be on x's device), and that device is current while the op runs.
class DeviceScope {
 public:
  DeviceScope(const at::Tensor& x, const char* op) : guard_(checked(x, op)) {}

 private:
  static c10::Device checked(const at::Tensor& x, const char* op) {
    TORCH_CHECK(x.is_cuda(), "dynnet: ", op, "'s CUDA kernel got x on ", x.device());
    return x.device();
  }
  c10::cuda::CUDAGuard guard_;
};

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

#else  // DYNNET_CUDA_HARNESS: the same names, on the shim

using harness::dynamic_smem;
using harness::launch;
using harness::set_max_dynamic_smem;

class DeviceScope {
 public:
  DeviceScope(const at::Tensor& x, const char* op) {
    TORCH_CHECK(x.device().is_cpu(), "dynnet: ", op, " in the CUDA harness runs on CPU tensors, got x on ",
                x.device());
  }
};

// NaN (all bits set, for every floating dtype) where no kernel thread writes: such an element
// then shows in every comparison.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options).fill_(std::numeric_limits<double>::quiet_NaN());
}

#endif

// Above the default limit a kernel must opt in before it is launched with more dynamic shared memory.
template <auto kKernel>
void allow_dynamic_smem(size_t bytes) {
  TORCH_CHECK(bytes <= kMaxSmemBytes, "dynnet: a kernel needs ", bytes, " bytes of shared memory, more than the ",
              kMaxSmemBytes, " a block can have");
  if (bytes > kDefaultSmemBytes) set_max_dynamic_smem<kKernel>(bytes);
}

// A 1-d grid of `blocks` blocks (gridDim.x holds up to 2^31 - 1; y and z only 65535).
inline dim3 grid_1d(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks > 0 && blocks <= std::numeric_limits<int32_t>::max(), "dynnet: ", what, " needs ", blocks,
              " blocks, more than a CUDA grid holds");
  return dim3(static_cast<unsigned>(blocks));
}

}  // namespace dynnet
