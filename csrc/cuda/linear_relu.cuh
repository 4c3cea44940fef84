// CUDA kernels of dynnet::linear_relu and dynnet::linear_relu_backward (same semantics, outputs
// and errors as csrc/cpu/linear_relu.cpp), with their host launchers. Compiled by nvcc through
// linear_relu.cu, and by the host compiler for the CPU harness (harness/, runtime.cuh); included
// by exactly one translation unit of each build.
//
// Forward, x2 = x viewed as (M, K), weight (N, K), bias (N):
//   y = act(x2 @ weight.T + bias)                    y: (M, N), one launch, one store per element
// Backward, g = (y <= 0 ? 0 : grad_y) for 'relu' (grad_y itself for 'none'):
//   grad_x      = g @ weight        (M, K)           one launch
//   grad_weight = g.T @ x2          (N, K)           one launch, which also writes
//   grad_bias   = sum_m g[m, :]     (N)              (blocks owning column tile 0 sum g's columns)
// g is never materialised: the mask is applied while grad_y tiles are loaded into shared memory.
//
// All three products are one tiled GEMM, C (rows x cols) = sum_l A(i, l) * B(l, j), that differs
// only in how A and B lie in memory ("role"):
//   role        C        rows cols red   A(i, l)             B(l, j)
//   Forward     y        M    N    K     x2[i, l]            weight[j, l]
//   GradInput   grad_x   M    K    N     g[i, l]             weight[l, j]
//   GradWeight  grad_w   N    K    M     g[l, i]             x2[l, j]
// An operand is either "reduction-contiguous" (l is its fastest index) or "output-contiguous".
// Tile loads walk the contiguous index fastest, so a warp's global loads coalesce either way,
// and always store to shared memory as [l][i], so the inner product reads are the same code.
//
// Work split: a block of 256 threads computes a 64 x 64 tile of C, stepping through the
// reduction in slices of 32. Thread (tx, ty) of the 16 x 16 grid owns the 4 x 4 outputs
// (ty + 16 i, tx + 16 j): strided rather than contiguous ownership makes every shared-memory
// read in the inner loop either a broadcast (A) or 16 consecutive words (B), so there are no
// bank conflicts without any swizzle. The next slice is fetched into registers while the current
// one is multiplied (one shared buffer, loads in flight during the FMAs). The grid is 1-D over
// all tiles (2^31 - 1 blocks, no 65535 limit on any dimension); consecutive blocks share a
// column tile of B, which then stays in L2.
//
// Precision: accumulation in at::opmath_type (double for float64, float otherwise); half and
// bfloat16 are widened to float as they are loaded, so shared memory holds float. float32 is
// plain FMA, never TF32 (allowTF32CuBLAS is not consulted: results are at least as exact as
// stock's default). Tensor cores are not used: correctness first, and the seed's layers
// (64 x 1000 -> 100, 64 x 100 -> 100) are latency-bound, not FLOP-bound.
//
// grad_bias accumulates in at::acc_type<scalar_t, /*is_cuda=*/false> (double for float32, as the
// CPU kernel does): it is a long sum over M of one column, cheap next to the GEMMs, and a float
// running sum over 1e5 rows would drift by ~1e-4 relative.
//
// Speed (not measured: written without a GPU): at the seed's input layer (M = 64, K = 1000,
// N = 100) the forward has only 2 blocks, each walking 32 reduction slices in series, so it is
// latency-bound; if it loses to cuBLAS there, a deterministic split of the reduction across the
// warps of a block (partials summed in a fixed order) is the next step. Large shapes would gain
// from tensor cores (WMMA/wgmma for half types, TF32): not done, for the reasons above.
//
// Determinism: every output element is reduced by one thread in a fixed order, grad_bias by one
// thread per column, rows in order; no atomics, no split-K.
//
// NaN behaves as in stock PyTorch: ReLU is `v < 0 ? 0 : v`, which keeps NaN (fmaxf(NaN, 0) would
// give 0), and the backward mask is `y <= 0 ? 0 : g`, which lets the gradient through where y is
// NaN, exactly as threshold_backward (ReLU's stock backward) does.

#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "gemm.cuh"
#include "ops.h"
#include "runtime.cuh"

namespace dynnet {
namespace {

// grad_bias alone (grad_weight not asked for, or K == 0 so grad_weight has no tiles): column sums
// of g (M, N), one thread per column, rows in order - the same order as the fused sum in
// gemm_kernel, so asking for grad_bias with or without grad_weight gives the same bits.
// Consecutive threads read consecutive columns (coalesced). Rarely used (DynamicNet always asks
// for grad_weight too), so kept simple rather than split over rows.
constexpr int kSumThreads = 128;

template <typename scalar_t, bool kRelu>
__global__ void __launch_bounds__(kSumThreads)
    bias_grad_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ y,
                     scalar_t* __restrict__ grad_bias, int64_t M, int64_t N) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;  // see the header
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kSumThreads + threadIdx.x;
  if (n >= N) return;
  acc_t sum = acc_t(0);
  for (int64_t m = 0; m < M; ++m) {
    // Widened exactly as gemm_kernel's tiles are, so both paths add the same values.
    at::opmath_type<scalar_t> v = grad_y[m * N + n];
    if constexpr (kRelu) v = static_cast<at::opmath_type<scalar_t>>(y[m * N + n]) <= 0 ? 0 : v;
    sum += static_cast<acc_t>(v);
  }
  grad_bias[n] = static_cast<scalar_t>(sum);
}

template <typename scalar_t, Role kRole, bool kRelu, bool kBias>
void launch_gemm_kernel(GemmArgs<scalar_t> args) {
  args.row_tiles = ceil_div<int64_t>(args.rows, kBM);
  const int64_t blocks = args.row_tiles * ceil_div<int64_t>(args.cols, kBN);
  launch<gemm_kernel<scalar_t, kRole, kRelu, kBias>>(grid_1d(blocks, "the CUDA GEMM"), kThreads, 0, args);
}

// The runtime switches as template arguments (GradInput has no bias variant).
template <typename scalar_t, Role kRole>
void launch_gemm(const GemmArgs<scalar_t>& args, bool relu, bool bias) {
  if constexpr (kRole == Role::GradInput) {
    relu ? launch_gemm_kernel<scalar_t, kRole, true, false>(args) : launch_gemm_kernel<scalar_t, kRole, false, false>(args);
  } else if (relu) {
    bias ? launch_gemm_kernel<scalar_t, kRole, true, true>(args) : launch_gemm_kernel<scalar_t, kRole, true, false>(args);
  } else {
    bias ? launch_gemm_kernel<scalar_t, kRole, false, true>(args) : launch_gemm_kernel<scalar_t, kRole, false, false>(args);
  }
}

}  // namespace

at::Tensor linear_relu_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            c10::string_view activation) {
  check_linear_args(x, weight, bias);
  const Activation act = parse_activation(activation);
  const DeviceScope scope(x, "linear_relu");
  count_kernel_call(KernelOp::LinearRelu, c10::DeviceType::CUDA);

  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = leading_rows(x);
  // Allocated in its final shape: the op returns a tensor that is nobody's view (autograd
  // forbids in-place changes to views made inside a custom Function).
  at::Tensor y = new_output(linear_out_shape(x, weight), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M > 0 && N > 0) {  // K == 0 still launches: y = act(bias), or zeros
    const at::Tensor x2 = x.reshape({M, K}).contiguous();
    const at::Tensor w = weight.contiguous();
    const bool has_bias = bias.has_value();
    const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_relu_cuda", [&] {
      GemmArgs<scalar_t> args{};
      args.a = x2.const_data_ptr<scalar_t>();
      args.b = w.const_data_ptr<scalar_t>();
      args.bias = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
      args.c = y.data_ptr<scalar_t>();
      args.rows = M, args.cols = N, args.red = K;
      launch_gemm<scalar_t, Role::Forward>(args, act == Activation::Relu, has_bias);
    });
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& y,
    c10::string_view activation, std::array<bool, 3> output_mask) {
  const Activation act = parse_activation(activation);
  TORCH_CHECK(act == Activation::None || y.has_value(),
              "dynnet: linear_relu_backward needs the forward output y when activation='relu'");
  check_linear_backward_args(grad_y, x, weight, y.has_value() ? *y : grad_y);
  const DeviceScope scope(x, "linear_relu_backward");
  count_kernel_call(KernelOp::LinearReluBackward, c10::DeviceType::CUDA);

  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = leading_rows(x);
  const auto [need_gx, need_gw, need_gb] = output_mask;
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = need_gx ? new_output(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous)) : empty();
  at::Tensor gw = need_gw ? new_output({N, K}, x.options()) : empty();
  at::Tensor gb = need_gb ? new_output({N}, x.options()) : empty();

  const bool relu = act == Activation::Relu;
  const bool launch_gx = need_gx && M > 0 && K > 0;
  const bool launch_gw = need_gw && N > 0 && K > 0;
  // grad_bias rides along with grad_weight when that GEMM runs; otherwise it gets its own kernel.
  const bool fused_gb = need_gb && launch_gw;
  const bool launch_gb = need_gb && !fused_gb && N > 0;
  if (launch_gx || launch_gw || launch_gb) {
    const at::Tensor gy2 = grad_y.reshape({M, N}).contiguous();
    const at::Tensor y2 = relu ? y->reshape({M, N}).contiguous() : at::Tensor();
    const at::Tensor w = launch_gx ? weight.contiguous() : at::Tensor();
    const at::Tensor x2 = launch_gw ? x.reshape({M, K}).contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_relu_backward_cuda", [&] {
      const scalar_t* gyp = gy2.const_data_ptr<scalar_t>();
      const scalar_t* yp = relu ? y2.const_data_ptr<scalar_t>() : nullptr;
      if (launch_gx) {
        GemmArgs<scalar_t> args{};
        args.a = gyp, args.y = yp, args.b = w.const_data_ptr<scalar_t>();
        args.c = gx.data_ptr<scalar_t>();
        args.rows = M, args.cols = K, args.red = N;
        launch_gemm<scalar_t, Role::GradInput>(args, relu, false);
      }
      if (launch_gw) {
        GemmArgs<scalar_t> args{};
        args.a = gyp, args.y = yp, args.b = x2.const_data_ptr<scalar_t>();
        args.c = gw.data_ptr<scalar_t>();
        args.bias_grad = fused_gb ? gb.data_ptr<scalar_t>() : nullptr;
        args.rows = N, args.cols = K, args.red = M;
        launch_gemm<scalar_t, Role::GradWeight>(args, relu, fused_gb);
      }
      if (launch_gb) {
        const dim3 grid = grid_1d(ceil_div<int64_t>(N, kSumThreads), "grad_bias");
        scalar_t* gbp = gb.data_ptr<scalar_t>();
        if (relu) {
          launch<bias_grad_kernel<scalar_t, true>>(grid, kSumThreads, 0, gyp, yp, gbp, M, N);
        } else {
          launch<bias_grad_kernel<scalar_t, false>>(grid, kSumThreads, 0, gyp, yp, gbp, M, N);
        }
      }
    });
  }
  // Every output not launched for has no elements; a zero-length reduction (M, N or K == 0 on the
  // summed side) still launches and writes zeros.
  return {gx, gw, gb};
}

}  // namespace dynnet
