// CPU building blocks shared by the layer ops (linear_relu.cpp) and the whole-network ops
// (dynamic_net.cpp). The loops are serial: callers split the work across threads.
//
// NaN behaves as in stock PyTorch: ReLU is `v < 0 ? 0 : v`, which keeps NaN (fmax(NaN, 0) would
// give 0), and the backward mask is `y <= 0 ? 0 : g`, which lets the gradient through where y is
// NaN, exactly as threshold_backward (ReLU's stock backward) does. `y > 0 ? g : 0` would not.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/ATen.h>
#include <ATen/CPUFunctions.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/GradMode.h>

#include <vector>

#include "../common.h"

namespace dynnet {

// y2 = act(x2 @ weight.T + bias) for 2-d x2 (M, K), y2 (M, N) with contiguous rows, any M
// (a caller may pass a slice of rows); z2 (the same shape, when defined) gets the pre-activation
// of a smooth activation. Defined in linear_relu.cpp.
void linear_act_2d(at::Tensor& y2, const at::Tensor& x2, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, Activation act, const at::Tensor& z2 = {});

// Runs fn(t) for t in [0, tasks), one task per thread (fewer threads than tasks: several each).
// The tasks call ATen directly (at::cpu::mm_out: no dispatcher) or make views; on an OpenMP
// worker those views would otherwise go through autograd (a worker starts with grad mode on and
// no dispatch keys excluded). The caller's other thread-local state - Python modes, saved-tensor
// hooks - is not carried over on purpose: it belongs to the op, not to its inner loops, and
// anything that called back into Python from a worker would wait for the GIL the caller holds.
template <typename F>
void parallel_tasks(int64_t tasks, const F& fn) {
  if (tasks == 1) return fn(0);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::NoGradGuard no_grad;
    for (int64_t t = begin; t < end; ++t) fn(t);
  });
}

// dst = (y <= 0 ? 0 : g) over n contiguous elements: ReLU's backward mask from its output.
template <typename scalar_t>
void relu_mask(scalar_t* __restrict__ dst, const scalar_t* __restrict__ g, const scalar_t* __restrict__ y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t v = g[j];  // loaded unconditionally: a load inside the select would stop vectorisation
    dst[j] = y[j] <= scalar_t(0) ? scalar_t(0) : v;
  }
}

// acc[j] += row[j] for j < width, in acc_t: one row's step of a column sum.
template <typename acc_t, typename scalar_t>
void add_row(acc_t* __restrict__ acc, const scalar_t* __restrict__ row, int64_t width) {
  for (int64_t j = 0; j < width; ++j) acc[j] += static_cast<acc_t>(row[j]);
}

// out[j - c0] = sum over rows i (in order) of g[i * ld + j], for columns c0 <= j < c1, accumulated
// in acc_type (double for float): each column is summed by one thread in a fixed order, so the
// result does not depend on how columns are split across threads.
template <typename scalar_t>
void column_sums(const scalar_t* __restrict__ g, int64_t ld, int64_t rows, int64_t c0, int64_t c1,
                 scalar_t* __restrict__ out) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const int64_t width = c1 - c0;
  std::vector<acc_t> acc_buf(width, acc_t(0));
  acc_t* __restrict__ acc = acc_buf.data();
  for (int64_t i = 0; i < rows; ++i) add_row(acc, g + i * ld + c0, width);
  for (int64_t j = 0; j < width; ++j) out[j] = static_cast<scalar_t>(acc[j]);
}

}  // namespace dynnet
