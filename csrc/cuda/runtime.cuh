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
//   sm_count()                                          the device's multiprocessors (the harness: an H200's 132)
//   vendor_gemm(VendorGemm)                             c = a @ b (+ bias, ReLU) by cuBLAS(Lt) through ATen;
//                                                       the harness: a float64 reference that also
//                                                       checks and records each call's BLAS layout
// A new GPU-only facility (another runtime call) belongs here too, with a CPU stand-in, so that
// the launcher calling it still runs in the harness.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

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

// One GEMM handed to the vendor library: c (m x n, contiguous) = a (m x k) @ b (k x n), then the
// epilogue. a and b are views whose layout cuBLAS takes as it is: one unit stride and a leading
// dimension at least the other extent (blas_layout), so that ATen never copies an operand.
enum class VendorEpilogue { None, Bias, BiasRelu };

struct VendorGemm {
  at::Tensor c, a, b, bias;  // bias: (n,), contiguous, for Bias and BiasRelu
  VendorEpilogue epilogue = VendorEpilogue::None;
};

inline const char* epilogue_name(VendorEpilogue e) {
  return e == VendorEpilogue::None ? "none" : e == VendorEpilogue::Bias ? "bias" : "bias_relu";
}

// How a 2-d view lies for BLAS, in row-major terms: not transposed (row-major, ld = stride(0))
// or transposed (column-major, ld = stride(1)). A dimension of extent 1 takes any stride.
struct BlasLayout {
  bool ok = false, transposed = false;
  int64_t ld = 0;
};

inline BlasLayout blas_layout(const at::Tensor& t) {
  BlasLayout l;
  if (t.dim() != 2) return l;
  const int64_t r = t.size(0), c = t.size(1);
  const bool unit_cols = t.stride(1) == 1 || c == 1, unit_rows = t.stride(0) == 1 || r == 1;
  if (unit_cols && (t.stride(0) >= std::max<int64_t>(1, c) || r == 1)) {
    l.ok = true, l.ld = std::max<int64_t>(r == 1 ? c : t.stride(0), 1);
  } else if (unit_rows && (t.stride(1) >= std::max<int64_t>(1, r) || c == 1)) {
    l.ok = true, l.transposed = true, l.ld = std::max<int64_t>(c == 1 ? r : t.stride(1), 1);
  }
  return l;
}

// What a VendorGemm asks of cuBLAS; the harness records one per call for the tests.
struct VendorGemmRecord {
  int64_t m, n, k, lda, ldb, ldc;
  bool trans_a, trans_b;
  std::string epilogue, dtype;
  bool lt_epilogue;  // cuBLASLt runs the epilogue (else ATen's plain GEMM and a separate pass)
};

// Whether ATen sends this GEMM through cuBLASLt with the epilogue fused (ATen's own conditions,
// isInputCompliesAddmmCudaLt in aten/src/ATen/native/cuda/Blas.cpp, torch 2.4 to 2.14): a 1-d
// contiguous bias, a contiguous 2-d result, every matrix dimension above 1. Otherwise ATen
// copies the bias into c and runs a plain GEMM (and a separate ReLU): the same results, slower.
inline bool lt_epilogue_applies(const VendorGemm& g) {
  if (g.epilogue == VendorEpilogue::None) return false;
  return g.bias.defined() && g.bias.dim() == 1 && g.bias.is_contiguous() && g.c.is_contiguous() &&
         g.a.size(0) > 1 && g.a.size(1) > 1 && g.b.size(0) > 1 && g.b.size(1) > 1;
}

// Checks what every vendor GEMM must satisfy (an internal error otherwise: the host code built a
// wrong descriptor) and describes it.
inline VendorGemmRecord check_vendor_gemm(const VendorGemm& g) {
  TORCH_CHECK(g.a.dim() == 2 && g.b.dim() == 2 && g.c.dim() == 2, "dynnet internal error: a vendor GEMM takes 2-d operands");
  const int64_t m = g.c.size(0), n = g.c.size(1), k = g.a.size(1);
  TORCH_CHECK(g.a.size(0) == m && g.b.size(0) == k && g.b.size(1) == n, "dynnet internal error: vendor GEMM shapes ",
              g.a.sizes(), " @ ", g.b.sizes(), " -> ", g.c.sizes());
  TORCH_CHECK(g.c.is_contiguous(), "dynnet internal error: a vendor GEMM writes a contiguous result");
  const BlasLayout la = blas_layout(g.a), lb = blas_layout(g.b);
  TORCH_CHECK(la.ok && lb.ok, "dynnet internal error: a vendor GEMM operand is not in a BLAS layout (strides ",
              g.a.strides(), ", ", g.b.strides(), "): ATen would copy it");
  const bool has_bias = g.epilogue != VendorEpilogue::None;
  TORCH_CHECK(has_bias == g.bias.defined(), "dynnet internal error: a vendor GEMM's bias and epilogue disagree");
  TORCH_CHECK(!has_bias || (g.bias.dim() == 1 && g.bias.size(0) == n), "dynnet internal error: vendor GEMM bias ",
              g.bias.sizes(), " for ", n, " columns");
  return {m, n, k, la.ld, lb.ld, std::max<int64_t>(n, 1), la.transposed, lb.transposed, epilogue_name(g.epilogue),
          std::string(c10::toString(g.c.scalar_type())), lt_epilogue_applies(g)};
}

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

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// ATen's GEMMs are stock's: cuBLASLt with the bias (and ReLU) epilogue where ATen can use it,
// tensor cores for half types, TF32 for float32 exactly when torch's setting allows it.
inline void vendor_gemm(const VendorGemm& g) {
  check_vendor_gemm(g);
  at::Tensor c = g.c;
  switch (g.epilogue) {
    case VendorEpilogue::None: at::mm_out(c, g.a, g.b); break;
    case VendorEpilogue::Bias: at::addmm_out(c, g.bias, g.a, g.b); break;
    case VendorEpilogue::BiasRelu: at::_addmm_activation_out(c, g.bias, g.a, g.b, 1, 1, /*use_gelu=*/false); break;
  }
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

inline int sm_count() { return 132; }  // the H200's, so that grids are sized as on the device

// Every vendor GEMM the harness ran since the last clear (tests read it: harness module's vendor_log).
inline std::vector<VendorGemmRecord>& vendor_log() {
  static std::vector<VendorGemmRecord> log;
  return log;
}

// The reference for cuBLAS: the product in float64 of exactly the views cuBLAS would read, the
// epilogue (ReLU as torch.relu: NaN stays NaN), one rounding to c's dtype.
inline void vendor_gemm(const VendorGemm& g) {
  if (vendor_log().size() >= 65536) vendor_log().clear();  // a test reads the last few; never grow without bound
  vendor_log().push_back(check_vendor_gemm(g));
  at::Tensor v = at::matmul(g.a.to(at::kDouble), g.b.to(at::kDouble));
  if (g.epilogue != VendorEpilogue::None) v.add_(g.bias.to(at::kDouble));
  if (g.epilogue == VendorEpilogue::BiasRelu) v = at::where(v < 0, at::zeros_like(v), v);
  g.c.copy_(v);
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
