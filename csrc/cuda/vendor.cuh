// The vendor path of the layer ops (paths.h says when it runs): the GEMMs through cuBLAS/cuBLASLt
// (runtime.cuh's vendor_gemm: ATen's addmm / _addmm_activation / mm, the very GEMMs stock
// nn.Linear runs), and the one pass of the project's own that the backward needs around them.
//
// Forward, x2 (M, K), weight (N, K):
//   y = x2 @ weight.T + bias      one GEMM, cuBLASLt's BIAS epilogue (ATen uses it for a 1-d
//                                 contiguous bias and every dimension > 1)
//   ReLU                          in cuBLASLt's RELU_BIAS epilogue only where the table says that
//                                 epilogue keeps NaN (paths::Table::lt_relu_keeps_nan, false until
//                                 a GPU test has shown it: torch.relu(NaN) is NaN, fmax-style ReLUs
//                                 give 0); otherwise torch's own ReLU in place on y (one more pass,
//                                 as stock nn.Linear + nn.ReLU make). K = 0 never uses the epilogue
//                                 (ATen returns the bias before applying it).
// Backward:
//   g = mask(grad_y), grad_bias   ONE pass (masked_grad_kernel): reads grad_y and y once, writes g
//                                 (only if a GEMM needs it) and grad_bias = column sums of g, in a
//                                 fixed order (no atomics: bitwise reproducible)
//   grad_x = g @ weight           cuBLAS
//   grad_w = g.T @ x2             cuBLAS
// Without ReLU, g is grad_y itself and the pass only sums. Empty dimensions never reach cuBLAS:
// a zero-length reduction writes zeros (or the bias) directly.
//
// Column sums (masked_grad_kernel): blocks of 256 threads own 32 columns (gemm.cuh's column_sums:
// lane = column, coalesced; warps take rows in order); when the columns alone give too few blocks
// for the GPU (N = 100: 4), the rows are split into chunks (column_sum_chunks) whose partial sums
// (acc_type: double for float32) a second kernel adds in chunk order. The split depends on the
// shape and the SM count only, so repeated calls give the same bits.
//
// Precision: whatever stock's GEMMs do (ATen follows torch.backends.cuda.matmul.allow_tf32 and
// the reduced-precision-reduction flags), so the vendor path's GEMM results equal stock's.
//
// Performance model (H200; predictions; dynnet_ext/gpu_model.py):
//   shape (M x K -> N)              launches  cuBLAS (Lt)       own pass           predicted
//   64 x 1000 -> 100 f32 forward    1 (+1)    ~5 us (latency)   (ReLU 2 us)        ~7 us GPU, ~10 us host
//   64 x 1000 -> 100 f32 backward   3         2 x ~5 us         12.8 KB x3, 2.5 us ~13 us
//   4096 x 1024 -> 1024 bf16 fwd    1         17 GFLOP, 22 us   (ReLU 8 MB: 4 us)  ~22-26 us
//   4096 x 1024 -> 1024 bf16 bwd    3         2 x 22 us         24 MB: 6 us        ~50 us
//   4096 x 1024 -> 1024 f32 fwd     1         8.6 G FP32 ~170us                    ~170 us (TF32: ~30 us)
#pragma once

#include <ATen/AccumulateType.h>

#include <algorithm>
#include <limits>

#include "../common.h"
#include "gemm.cuh"
#include "paths.h"
#include "runtime.cuh"

namespace dynnet {
namespace {

constexpr int64_t kMinRowsPerSplit = 256;  // a chunk of fewer rows costs more to add up than it saves

// g = mask(grad_y) over the rows of chunk blockIdx.y, and the chunk's column sums of g: directly
// into grad_bias when there is one chunk, else into partials[chunk][col].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    masked_grad_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ y, scalar_t* __restrict__ g,
                       scalar_t* __restrict__ grad_bias, at::acc_type<scalar_t, false>* __restrict__ partials,
                       int64_t M, int64_t N, int64_t rows_per_chunk) {
  using sum_t = at::acc_type<scalar_t, false>;
  __shared__ sum_t partial[kThreads];
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kColSumCols, chunk = blockIdx.y;
  const int64_t begin = chunk * rows_per_chunk, end = M < begin + rows_per_chunk ? M : begin + rows_per_chunk;
  const sum_t total = column_sums(grad_y, y, g, N, begin, end, col0, partial);
  const int64_t col = col0 + threadIdx.x;
  if (threadIdx.x < 32 && col < N) {
    if (partials != nullptr) {
      partials[chunk * N + col] = total;
    } else if (grad_bias != nullptr) {
      grad_bias[col] = static_cast<scalar_t>(total);
    }
  }
}

// grad_bias[col] = the chunks' partial sums of column col, added in chunk order.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const at::acc_type<scalar_t, false>* __restrict__ partials, scalar_t* __restrict__ grad_bias,
                        int64_t N, int64_t chunks) {
  using sum_t = at::acc_type<scalar_t, false>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= N) return;
  sum_t total = partials[col];
  for (int64_t c = 1; c < chunks; ++c) total += partials[c * N + col];
  grad_bias[col] = static_cast<scalar_t>(total);
}

// How many row chunks the column sums of an M x N matrix take: enough blocks for two per SM, no
// chunk under kMinRowsPerSplit rows, at most 65535 (the grid's y limit).
inline int64_t column_sum_chunks(int64_t M, int64_t N) {
  const int64_t col_blocks = ceil_div<int64_t>(N, kColSumCols);
  const int64_t wanted = ceil_div<int64_t>(2 * sm_count(), col_blocks);
  return std::clamp<int64_t>(std::min(wanted, ceil_div<int64_t>(M, kMinRowsPerSplit)), 1, 65535);
}

// The pass: g (if not null) = mask(grad_y) (or grad_y, y null), grad_bias (if not null) = column
// sums of it. grad_y, y, g: (M, N) contiguous.
template <typename scalar_t>
void masked_grad(const scalar_t* grad_y, const scalar_t* y, scalar_t* g, scalar_t* grad_bias, int64_t M, int64_t N,
                 const at::TensorOptions& options) {
  if (N == 0 || (g == nullptr && grad_bias == nullptr)) return;
  // Only g to write: chunks of kMinRowsPerSplit rows, for bandwidth.
  const int64_t wanted = grad_bias != nullptr ? column_sum_chunks(M, N)
                                              : ceil_div<int64_t>(std::max<int64_t>(M, 1), kMinRowsPerSplit);
  const int64_t chunks = std::clamp<int64_t>(wanted, 1, 65535);
  const int64_t rows_per_chunk = std::max<int64_t>(ceil_div<int64_t>(M, chunks), 1);
  const int64_t used = std::max<int64_t>(ceil_div<int64_t>(M, rows_per_chunk), 1);  // <= chunks
  const int64_t col_blocks = ceil_div<int64_t>(N, kColSumCols);
  TORCH_CHECK(col_blocks <= std::numeric_limits<int32_t>::max(), "dynnet: ", N,
              " columns need more blocks than a CUDA grid holds");
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(used));
  using sum_t = at::acc_type<scalar_t, false>;
  if (used == 1 || grad_bias == nullptr) {
    launch<masked_grad_kernel<scalar_t>>(grid, kThreads, 0, grad_y, y, g, grad_bias, static_cast<sum_t*>(nullptr), M,
                                         N, rows_per_chunk);
    return;
  }
  at::Tensor partials = new_output({used, N}, options.dtype(c10::CppTypeToScalarType<sum_t>::value));
  sum_t* pp = partials.data_ptr<sum_t>();
  launch<masked_grad_kernel<scalar_t>>(grid, kThreads, 0, grad_y, y, g, grad_bias, pp, M, N, rows_per_chunk);
  launch<sum_partials_kernel<scalar_t>>(grid_1d(ceil_div<int64_t>(N, kThreads), "grad_bias"), kThreads, 0, pp,
                                        grad_bias, N, used);
}

// A vendor GEMM, or what it would compute where a dimension is empty (cuBLAS never sees those).
inline void run_gemm(const VendorGemm& g) {
  if (g.c.numel() == 0) return;
  if (g.a.size(1) == 0) {  // no reduction: c = bias (+ ReLU) or 0
    at::Tensor c = g.c;
    if (g.epilogue == VendorEpilogue::None) {
      c.zero_();
    } else {
      c.copy_(g.bias.expand_as(c));
      if (g.epilogue == VendorEpilogue::BiasRelu) at::relu_(c);
    }
    return;
  }
  vendor_gemm(g);
}

// A 2-d view cuBLAS takes as it lies (row- or column-major), or a contiguous copy.
inline at::Tensor blas_ready(const at::Tensor& t) { return blas_layout(t).ok ? t : t.contiguous(); }

}  // namespace

// y2 (M, N, contiguous) = act(x2 @ w.T + bias); x2 (M, K), w (N, K); bias undefined for none.
inline void vendor_linear_forward(const at::Tensor& y2, const at::Tensor& x2, const at::Tensor& w,
                                  const at::Tensor& bias, bool relu) {
  VendorGemm g;
  g.c = y2, g.a = blas_ready(x2), g.b = blas_ready(w.t());
  const bool lt_relu = relu && bias.defined() && paths::table().lt_relu_keeps_nan && x2.size(1) > 0;
  if (bias.defined()) {
    g.bias = bias.contiguous();
    g.epilogue = lt_relu ? VendorEpilogue::BiasRelu : VendorEpilogue::Bias;
  }
  run_gemm(g);
  if (relu && !lt_relu) {
    at::Tensor y = y2;
    at::relu_(y);  // torch's ReLU: NaN stays NaN
  }
}

// The backward: gx2 (M, K), gw (N, K), gb (N) - each undefined when not asked for. gy2 and y2
// (M, N) contiguous; y2 undefined without ReLU.
template <typename scalar_t>
void vendor_linear_backward(const at::Tensor& gy2, const at::Tensor& y2, const at::Tensor& x2, const at::Tensor& w,
                            const at::Tensor& gx2, const at::Tensor& gw, const at::Tensor& gb) {
  const int64_t M = gy2.size(0), N = gy2.size(1);
  const bool relu = y2.defined();
  const bool gemms = (gx2.defined() && gx2.numel() > 0) || (gw.defined() && gw.numel() > 0);
  at::Tensor g = gy2;
  if (relu && gemms) g = new_output({M, N}, gy2.options());
  scalar_t* gbp = gb.defined() ? gb.data_ptr<scalar_t>() : nullptr;
  masked_grad<scalar_t>(gy2.const_data_ptr<scalar_t>(), relu ? y2.const_data_ptr<scalar_t>() : nullptr,
                        relu && gemms ? g.data_ptr<scalar_t>() : nullptr, gbp, M, N, gy2.options());
  if (gx2.defined()) {
    VendorGemm p;
    p.c = gx2, p.a = g, p.b = blas_ready(w);
    run_gemm(p);
  }
  if (gw.defined()) {
    VendorGemm p;
    p.c = gw, p.a = g.t(), p.b = blas_ready(x2);
    run_gemm(p);
  }
}

}  // namespace dynnet
