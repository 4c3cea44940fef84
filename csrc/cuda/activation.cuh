// The activations of the CUDA kernels, elementwise, in at::opmath_type (float for float32 and the
// half types, double for float64): the custom path's forward epilogue (gemm.cuh's store_output)
// and its gradient loads (load_operand, column_sums), and the vendor path's one backward pass
// (vendor.cuh's masked_grad_kernel). Compiled by nvcc for the GPU and by the host compiler for
// the CPU harness (harness/shim.h defines __host__, __device__ and __forceinline__ there).
//
// The smooth activations are computed in the forms stock's CUDA kernels use (ATen's
// ActivationGeluKernel.cu and ActivationSiluKernel.cu), so a GPU result differs from stock's only
// by how the compiler contracts them into FMAs - not by formula:
//   gelu       y = z/2 (1 + erf(z / sqrt 2))              y' = (1 + erf(z / sqrt 2))/2 + z e^(-z^2/2) / sqrt(2 pi)
//   gelu_tanh  y = z/2 (1 + tanh(u)), u = sqrt(2/pi) (z + 0.044715 z^3)
//                                                         y' = (1 + tanh u)/2 + z/2 (1 - tanh^2 u) u'
//   silu       y = z / (1 + e^-z)                         y' = s (1 + z (1 - s)),  s = 1 / (1 + e^-z)
// NaN and inf propagate as through those formulas, as stock's do. cuBLASLt's GELU epilogues are
// not stock's GELU (on the H200 up to 1.65e7 float32 ulps apart), so the vendor path keeps torch's
// own op after its GEMM (linear_relu.cuh).
#pragma once

#include <cmath>

#include "../common.h"
#include "runtime.cuh"

namespace dynnet {

template <typename T>
__device__ __forceinline__ T erf_of(T x) {
  if constexpr (sizeof(T) == 4) return erff(x); else return ::erf(x);
}
template <typename T>
__device__ __forceinline__ T exp_of(T x) {
  if constexpr (sizeof(T) == 4) return expf(x); else return ::exp(x);
}
template <typename T>
__device__ __forceinline__ T tanh_of(T x) {
  if constexpr (sizeof(T) == 4) return tanhf(x); else return ::tanh(x);
}

constexpr double kSqrtHalf = 0.70710678118654752440;       // 1 / sqrt 2
constexpr double kInvSqrt2Pi = 0.39894228040143267794;     // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;    // sqrt(2 / pi)
constexpr double kGeluTanhCubic = 0.044715;

// act(z) for a smooth activation.
template <typename T>
__device__ __forceinline__ T smooth_value(Activation act, T z) {
  if (act == Activation::Silu) return z / (T(1) + exp_of(-z));
  if (act == Activation::GeluTanh) {
    const T inner = T(kSqrt2OverPi) * (z + T(kGeluTanhCubic) * (z * z * z));
    return T(0.5) * z * (T(1) + tanh_of(inner));
  }
  return z * T(0.5) * (T(1) + erf_of(z * T(kSqrtHalf)));
}

// grad_y * act'(z) for a smooth activation.
template <typename T>
__device__ __forceinline__ T smooth_grad(Activation act, T gy, T z) {
  if (act == Activation::Silu) {
    const T s = T(1) / (T(1) + exp_of(-z));
    return gy * s * (T(1) + z * (T(1) - s));
  }
  if (act == Activation::GeluTanh) {
    const T z2 = z * z;
    const T t = tanh_of(T(kSqrt2OverPi) * (z + T(kGeluTanhCubic) * (z2 * z)));
    const T du = T(kSqrt2OverPi) * (T(1) + T(3 * kGeluTanhCubic) * z2);
    return gy * (T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * du);
  }
  const T cdf = T(0.5) * (T(1) + erf_of(z * T(kSqrtHalf)));
  const T pdf = exp_of(T(-0.5) * z * z) * T(kInvSqrt2Pi);
  return gy * (cdf + z * pdf);
}

// The gradient at the pre-activation, from grad_y's element gy and the saved tensor's element s
// (ReLU: the output y, masking as threshold_backward does - y <= 0 gives 0, NaN lets gy through;
// a smooth activation: the pre-activation z), widened to acc_t; rounded to the storage type
// scalar_t as stock's backward op returns it, so the GEMMs and sums after it add what stock's add.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t pre_activation_grad(Activation act, acc_t gy, acc_t s) {
  if (act == Activation::Relu) return s <= acc_t(0) ? acc_t(0) : gy;
  return static_cast<acc_t>(static_cast<scalar_t>(smooth_grad(act, gy, s)));
}

}  // namespace dynnet
