// CPU kernels of dynnet::dynamic_net and dynnet::dynamic_net_backward: the whole DynamicNet in
// one op each way.
//
// Forward, x2 = x viewed as (M, D_in), d = depth:
//   h_0 = relu(x2 @ w_in.T + b_in)                     (M, H)
//   h_k = relu(h_{k-1} @ w_h.T + b_h),  k = 1..d       (M, H), the same w_h, b_h each time
//   out = h_d @ w_out.T + b_out                        (M, D_out)
//   acts = [h_0; h_1; ...; h_d]                        ((d + 1) M, H), saved for the backward
// Backward, with G_k the gradient at layer k's pre-activation (G_0 the input layer's):
//   G_d     = mask(h_d) . (grad_out @ w_out)           mask(h) = (h <= 0 ? 0 : 1), as threshold_backward
//   G_{k-1} = mask(h_{k-1}) . (G_k @ w_h)
//   grad_x  = G_0 @ w_in
//   grad_w_in  = G_0.T @ x2,                 grad_b_in  = colsum(G_0)
//   grad_w_h   = [G_1; ..; G_d].T @ [h_0; ..; h_{d-1}],  grad_b_h = colsum([G_1; ..; G_d])
//   grad_w_out = grad_out.T @ h_d,           grad_b_out = colsum(grad_out)
// The shared layer's gradient, summed over its d uses, is ONE GEMM whose reduction runs over all
// d * M rows: G is stored like acts, G_k in rows k M .. (k + 1) M, so the two stacks line up.
//
// Why this is faster than per-layer ops (stock or fused) at small sizes: the whole pass is two or
// three parallel regions instead of ~10 ops and autograd nodes a layer, and the threads are used
// where they pay. ATen splits each small GEMM across threads itself, which scales badly (measured
// on 2 cores at the seed's shape: grad_w_in = g.T @ x takes 178 us on 2 threads and 138 us on 1;
// 100 x 100 layers are slower on 2 threads than on 1). Here each thread runs single-threaded
// GEMMs (the BLAS runs serially inside a parallel region) on its own share:
//   forward after the input layer, backward chain: rows of the batch. Rows are independent
//     through the whole network, so one parallel region carries a block of rows from h_0 to out
//     (or from grad_out to G_0 and grad_x) with no synchronisation between layers. The input
//     layer's GEMM (x is wide) is left to the BLAS's own threading, which splits it better.
//   weight gradients: output rows of each grad_w (hidden units, output units). Each thread owns
//     whole rows of every weight gradient and whole bias-gradient columns, so nothing is summed
//     across threads: no reduction step, and the bias sums (double accumulators, rows in order)
//     are the same bits for any thread count.
// Work below kMinTaskFlops is not split (waking a thread costs more than it saves).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

namespace dynnet {
namespace {

constexpr double kMinTaskFlops = 4e5;  // ~5 us of one core's GEMM throughput

// Number of tasks for `flops` of evenly divisible work: one per thread, fewer when small.
int64_t num_tasks(double flops) {
  const auto by_work = static_cast<int64_t>(flops / kMinTaskFlops);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_work));
}

// [begin, end) of task t's share when n items are split into `tasks` near-equal contiguous parts.
std::pair<int64_t, int64_t> share(int64_t n, int64_t t, int64_t tasks) { return {n * t / tasks, n * (t + 1) / tasks}; }

at::Tensor rows_of(const at::Tensor& t, int64_t begin, int64_t end) { return t.narrow(0, begin, end - begin); }

std::tuple<at::Tensor, at::Tensor> dynamic_net_cpu(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                                                   const std::optional<at::Tensor>& w_h,
                                                   const std::optional<at::Tensor>& b_h, const at::Tensor& w_out,
                                                   const at::Tensor& b_out, int64_t depth) {
  check_dynamic_net_args(x, w_in, b_in, w_h, b_h, w_out, b_out, depth);
  TORCH_CHECK(x.device().is_cpu(), "dynnet: dynamic_net's CPU kernel got x on ", x.device());
  count_kernel_call(KernelOp::DynamicNet, c10::DeviceType::CPU);
  const int64_t D_in = w_in.size(1), H = w_in.size(0), D_out = w_out.size(0);
  const int64_t M = leading_rows(x);
  auto out_shape = x.sizes().vec();
  out_shape.back() = D_out;
  const auto options = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty(out_shape, options);
  at::Tensor acts = at::empty({(depth + 1) * M, H}, options);
  if (M == 0) return {out, acts};

  // The input layer, usually the largest GEMM, on all rows at once: the BLAS's own threading
  // splits it better than rows do (measured at the seed's shape: 87 us against 100 us).
  at::Tensor h0 = rows_of(acts, 0, M);
  linear_act_2d(h0, as_2d(x, M, D_in), w_in, b_in, Activation::Relu);
  const at::Tensor out2 = out.view({M, D_out});
  const double flops = 2.0 * M * (depth * H * H + H * D_out);
  const int64_t tasks = std::min(num_tasks(flops), M);
  parallel_tasks(tasks, [&](int64_t t) {
    const auto [r0, r1] = share(M, t, tasks);
    at::Tensor h = rows_of(acts, r0, r1);
    for (int64_t k = 1; k <= depth; ++k) {
      at::Tensor next = rows_of(acts, k * M + r0, k * M + r1);
      linear_act_2d(next, h, *w_h, b_h, Activation::Relu);
      h = next;
    }
    at::Tensor o = rows_of(out2, r0, r1);
    linear_act_2d(o, h, w_out, b_out, Activation::None);
  });
  return {out, acts};
}

// Output mask / result order of dynamic_net_backward.
enum Grad { kX, kWIn, kBIn, kWH, kBH, kWOut, kBOut, kNumGrads };

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dynamic_net_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_in, const std::optional<at::Tensor>& w_h,
    const at::Tensor& w_out, const at::Tensor& acts_arg, int64_t depth, std::array<bool, kNumGrads> need) {
  check_dynamic_net_backward_args(grad_out, x, w_in, w_h, w_out, acts_arg, depth);
  TORCH_CHECK(x.device().is_cpu(), "dynnet: dynamic_net_backward's CPU kernel got x on ", x.device());
  count_kernel_call(KernelOp::DynamicNetBackward, c10::DeviceType::CPU);
  const int64_t D_in = w_in.size(1), H = w_in.size(0), D_out = w_out.size(0);
  const int64_t M = leading_rows(x);
  const auto options = x.options().memory_format(at::MemoryFormat::Contiguous);
  const auto alloc = [&](bool wanted, at::IntArrayRef shape) {
    return wanted ? at::empty(shape, options) : at::empty({0}, options);
  };
  at::Tensor gx = alloc(need[kX], x.sizes());
  at::Tensor gw_in = alloc(need[kWIn], {H, D_in}), gb_in = alloc(need[kBIn], {H});
  // The hidden layer's gradients are zero at depth 0 (it is not used); w_h may then be None.
  const bool hidden = depth > 0;
  at::Tensor gw_h = alloc(need[kWH], {H, H}), gb_h = alloc(need[kBH], {H});
  at::Tensor gw_out = alloc(need[kWOut], {D_out, H}), gb_out = alloc(need[kBOut], {D_out});
  if (!hidden) {
    gw_h.zero_();
    gb_h.zero_();
  }
  if (M == 0) {  // empty batch: every weight gradient is an empty sum
    for (at::Tensor* t : {&gw_in, &gb_in, &gw_h, &gb_h, &gw_out, &gb_out}) t->zero_();
    return {gx, gw_in, gb_in, gw_h, gb_h, gw_out, gb_out};
  }

  const at::Tensor x2 = as_2d(x, M, D_in);
  // Read through raw pointers below (the ReLU masks, the bias sums): contiguous, whatever layout
  // the caller passed (autograd passes the forward's contiguous acts; a direct caller may not).
  const at::Tensor go = grad_out.reshape({M, D_out}).contiguous();
  const at::Tensor acts = acts_arg.contiguous();
  const at::Tensor gx2 = need[kX] ? gx.view({M, D_in}) : gx;
  // G_k is needed down to G_0 when anything below the output layer asks for a gradient.
  const bool need_g = need[kX] || need[kWIn] || need[kBIn] || (hidden && (need[kWH] || need[kBH]));
  at::Tensor G = need_g ? at::empty({(depth + 1) * M, H}, options) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dynamic_net_backward_cpu", [&] {
    // 1. The chain grad_out -> G_d -> ... -> G_0 (-> grad_x), split by rows.
    if (need_g) {
      const double flops = 2.0 * M * (D_out * H + depth * H * H + (need[kX] ? H * D_in : 0));
      const int64_t tasks = std::min(num_tasks(flops), M);
      parallel_tasks(tasks, [&](int64_t t) {
        const auto [r0, r1] = share(M, t, tasks);
        const int64_t n = r1 - r0;
        at::Tensor g = rows_of(G, depth * M + r0, depth * M + r1);
        at::cpu::mm_out(g, rows_of(go, r0, r1), w_out);
        relu_mask(g.data_ptr<scalar_t>(), acts.const_data_ptr<scalar_t>() + (depth * M + r0) * H, n * H);
        for (int64_t k = depth; k >= 1; --k) {
          at::Tensor below = rows_of(G, (k - 1) * M + r0, (k - 1) * M + r1);
          at::cpu::mm_out(below, g, *w_h);
          relu_mask(below.data_ptr<scalar_t>(), acts.const_data_ptr<scalar_t>() + ((k - 1) * M + r0) * H, n * H);
          g = below;
        }
        if (need[kX]) {
          at::Tensor gxr = rows_of(gx2, r0, r1);
          at::cpu::mm_out(gxr, g, w_in);
        }
      });
    }

    // 2. Weight and bias gradients, split by output units: task t owns hidden units [u0, u1) (rows
    // of grad_w_in and grad_w_h, entries of their biases) and output units [o0, o1).
    const bool any_in = need[kWIn] || need[kBIn], any_h = hidden && (need[kWH] || need[kBH]);
    const bool any_out = need[kWOut] || need[kBOut];
    if (!(any_in || any_h || any_out)) return;
    const double flops =
        2.0 * M * ((need[kWIn] ? H * D_in : 0) + (any_h ? depth * H * H : 0) + (any_out ? D_out * H : 0));
    const int64_t tasks = std::min(num_tasks(flops), std::max<int64_t>(H, 1));
    const at::Tensor h_last = rows_of(acts, depth * M, (depth + 1) * M);
    parallel_tasks(tasks, [&](int64_t t) {
      const auto [u0, u1] = share(H, t, tasks);
      const auto [o0, o1] = share(D_out, t, tasks);
      if (u1 > u0) {
        const scalar_t* Gp = need_g ? G.const_data_ptr<scalar_t>() : nullptr;
        if (need[kWIn]) {
          at::Tensor dst = rows_of(gw_in, u0, u1);
          at::cpu::mm_out(dst, rows_of(G, 0, M).narrow(1, u0, u1 - u0).t(), x2);
        }
        if (need[kBIn]) column_sums(Gp, H, M, u0, u1, gb_in.data_ptr<scalar_t>() + u0);
        if (hidden && need[kWH]) {
          at::Tensor dst = rows_of(gw_h, u0, u1);
          at::cpu::mm_out(dst, rows_of(G, M, (depth + 1) * M).narrow(1, u0, u1 - u0).t(), rows_of(acts, 0, depth * M));
        }
        if (hidden && need[kBH]) column_sums(Gp + M * H, H, depth * M, u0, u1, gb_h.data_ptr<scalar_t>() + u0);
      }
      if (o1 > o0) {
        if (need[kWOut]) {
          at::Tensor dst = rows_of(gw_out, o0, o1);
          at::cpu::mm_out(dst, go.narrow(1, o0, o1 - o0).t(), h_last);
        }
        if (need[kBOut]) column_sums(go.const_data_ptr<scalar_t>(), D_out, M, o0, o1, gb_out.data_ptr<scalar_t>() + o0);
      }
    });
  });
  return {gx, gw_in, gb_in, gw_h, gb_h, gw_out, gb_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynnet, CPU, m) {
  m.impl("dynamic_net", &dynamic_net_cpu);
  m.impl("dynamic_net_backward", &dynamic_net_backward_cpu);
}

}  // namespace dynnet
