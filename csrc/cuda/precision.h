// What the CUDA GEMMs of a dtype compute in: the dispatch table's column (paths.h's Precision).
// Plain C++ on ATen's global context (no CUDA): used by the launchers (choose.cuh, both builds)
// and bound into dynnet_ext._C (paths_python.h), so the selection is one function, testable on
// any build.
//
// float32 is TF32 exactly where stock's cuBLAS(Lt) GEMMs use TF32: ATen decides that from
// float32Precision(CUDA, MATMUL) (the fp32_precision API, which inherits the generic
// torch.backends.fp32_precision and follows the legacy torch.backends.cuda.matmul.allow_tf32 /
// torch.set_float32_matmul_precision), and not inside at::NoTF32Guard - the same call in every
// supported torch (2.11 on). Neither allowTF32CuBLAS() nor float32MatmulPrecision() is used:
// both throw when the legacy and the new settings disagree (a user who sets only
// torch.backends.cuda.matmul.fp32_precision = "tf32" gets that state), while stock's GEMMs run
// fine there.
#pragma once

#include <ATen/Context.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "paths.h"

namespace dynnet {

inline bool cuda_matmul_uses_tf32() {
  if (at::NoTF32Guard::should_disable_tf32()) return false;
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
}

inline paths::Precision gemm_precision(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return paths::Precision::F64;
    case at::kHalf: return paths::Precision::F16;
    case at::kBFloat16: return paths::Precision::BF16;
    case at::kFloat: return cuda_matmul_uses_tf32() ? paths::Precision::TF32 : paths::Precision::F32;
    default: TORCH_CHECK_VALUE(false, "dynnet: no CUDA kernels for ", t, " (float64, float32, float16, bfloat16)");
  }
}

}  // namespace dynnet
