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
// Two implementations of the same plan:
//
// With the GEMM engine (gemm.h: float32, bfloat16, float16 on AVX2/AVX-512 CPUs), each pass is
// two parallel regions: one packs every weight operand - the hidden layer's w_h once for all
// its d uses (and once more, untransposed, for the backward chain) - and one computes. The
// forward carries each thread's block of batch rows from x through h_0..h_d to out without
// synchronising between layers (when the batch gives every thread two 6-row tiles; else layer
// by layer, each split over its columns). The backward chain does the same from grad_out down
// to G_0 and grad_x, ReLU's mask applied in each GEMM's store; the weight gradients then split
// by their rows (hidden units, output units) with the bias sums of the same units. Nothing is
// summed across threads and K is never split: the same bits for any thread count.
//
// With ATen (float64, the large products gemm::kernels_for gives to ATen, or
// DYNNET_EXT_CPU_GEMM=aten): the same splits, each thread running single-threaded BLAS GEMMs
// (the BLAS runs serially inside a parallel region) plus separate mask (stock's
// threshold_backward) and bias passes; the input layer's GEMM is left to the BLAS's own
// threading, which splits it better than rows do; ATen splits small GEMMs across threads badly
// on its own (benchmarks/results/README.md, thresholds: net-input-layer-blas-threads).
//
// Why this is faster than per-layer ops (stock or fused) at small sizes: a handful of parallel
// regions instead of ~10 ops and autograd nodes a layer, and threads used where they pay. Work
// below gemm.cpp's kMinTaskFlops is not split (waking a thread costs more than it saves).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <torch/library.h>

#include "gemm.h"
#include "building_blocks.h"

namespace dynnet {
namespace {

using gemm::num_tasks;  // one rule for when a thread pays, shared with the engine

// [begin, end) of task t's share when n items are split into `tasks` near-equal contiguous parts.
std::pair<int64_t, int64_t> share(int64_t n, int64_t t, int64_t tasks) { return {n * t / tasks, n * (t + 1) / tasks}; }

at::Tensor rows_of(const at::Tensor& t, int64_t begin, int64_t end) { return t.narrow(0, begin, end - begin); }

// The engine's operands from row r0 of a 2-d tensor on, without making a tensor for them: a
// narrow() is a dispatcher call and a view's bookkeeping, and the network op needed about ten of
// them a call (benchmarks/results/README.md, thresholds: net-row-views). row_ptr is for outputs
// this op allocated.
gemm::View rows_view(const at::Tensor& t, int64_t r0) {
  return {static_cast<const char*>(t.const_data_ptr()) + r0 * t.stride(0) * static_cast<int64_t>(t.element_size()),
          t.stride(0), t.stride(1)};
}
void* row_ptr(const at::Tensor& t, int64_t r0) { return const_cast<void*>(rows_view(t, r0).p); }
gemm::View transposed(gemm::View v) { return {v.p, v.cs, v.rs}; }


// ----------------------------------------------------------------------------------------------
// With the GEMM engine (gemm.h: float32 and the half types on AVX2/AVX-512 CPUs). Each weight is
// packed once per op call - the hidden layer's once for all its `depth` uses - in one parallel
// region; then the products run in one more region per pass when the batch has rows enough to
// give every thread two row tiles (each thread carries its rows through every layer: no
// synchronisation between layers), else layer by layer, each layer split across the threads.

// act(a @ w.T + bias) into c: M rows, w (N, K); a and c views of row-major matrices (bias
// undefined for none).
gemm::Problem linear_problem(int64_t M, gemm::View a, const at::Tensor& w, gemm::View c, const at::Tensor& bias,
                             bool relu) {
  gemm::Problem p = gemm::product(M, w.size(0), w.size(1), w.scalar_type(), a, gemm::view_of_t(w),
                                  const_cast<void*>(c.p), c.rs);
  p.epi.bias = bias.defined() ? bias.const_data_ptr() : nullptr;
  p.epi.relu = relu;
  return p;
}

// The phases that run `layers` in order (each reads the previous one's output) on all rows: one
// phase carrying each task's block of rows through every layer when the batch gives every task
// two row tiles, else one phase per layer, each split across the tasks.
void add_chain_phases(std::vector<std::function<void(int64_t)>>& phases, const gemm::Kernels* k,
                      const std::vector<const gemm::Problem*>& layers, const std::vector<gemm::PackedB>& packed,
                      int64_t M, int64_t T) {
  int64_t mr = 0;
  for (const auto& b : packed) mr = std::max(mr, gemm::row_tile(k, b));
  if (T > 1 && M >= 2 * mr * T) {
    phases.emplace_back([&layers, &packed, k, M, T](int64_t t) {
      const auto [r0, r1] = share(M, t, T);
      for (size_t i = 0; i < layers.size(); ++i) gemm::compute_rows(k, *layers[i], packed[i], r0, r1);
    });
    return;
  }
  for (size_t i = 0; i < layers.size(); ++i)
    phases.emplace_back([&layers, &packed, k, T, i](int64_t t) {
      gemm::compute(k, *layers[i], packed[i], gemm::split(k, *layers[i], packed[i], t, T));
    });
}

void dynamic_net_forward_engine(const gemm::Kernels* k, const at::Tensor& x2, const at::Tensor& w_in,
                                const at::Tensor& b_in, const std::optional<at::Tensor>& w_h,
                                const std::optional<at::Tensor>& b_h, const at::Tensor& w_out, const at::Tensor& b_out,
                                int64_t depth, at::Tensor& acts, at::Tensor& out2) {
  const int64_t M = x2.size(0), H = w_in.size(0), D_in = w_in.size(1), D_out = w_out.size(0);
  const at::Tensor bi = b_in.contiguous(), bo = b_out.contiguous();
  const at::Tensor bh = depth > 0 ? b_h->contiguous() : at::Tensor();
  std::vector<gemm::Problem> layers;
  layers.reserve(depth + 2);
  layers.push_back(linear_problem(M, gemm::view_of(x2), w_in, rows_view(acts, 0), bi, true));
  for (int64_t l = 1; l <= depth; ++l)
    layers.push_back(linear_problem(M, rows_view(acts, (l - 1) * M), *w_h, rows_view(acts, l * M), bh, true));
  layers.push_back(linear_problem(M, rows_view(acts, depth * M), w_out, gemm::view_of(out2), bo, false));
  std::vector<const gemm::Problem*> chain;
  for (const auto& p : layers) chain.push_back(&p);

  const int64_t T = num_tasks(2.0 * M * (H * D_in + depth * H * H + H * D_out));
  // Pack w_in, w_h (once) and w_out; every hidden layer reads the same packed w_h.
  std::vector<const gemm::Problem*> to_pack = {chain.front()};
  if (depth > 0) to_pack.push_back(chain[1]);
  to_pack.push_back(chain.back());
  const gemm::BPack pack(k, to_pack);
  std::vector<gemm::PackedB> packed;
  for (size_t i = 0; i < chain.size(); ++i)
    packed.push_back(i == 0 ? pack[0] : i + 1 == chain.size() ? pack[to_pack.size() - 1] : pack[1]);
  std::vector<std::function<void(int64_t)>> phases = {[&](int64_t t) { pack.run(t, T); }};
  add_chain_phases(phases, k, chain, packed, M, T);
  gemm::run_phases(T, phases);
}

void dynamic_net_backward_engine(const gemm::Kernels* k, const at::Tensor& go, const at::Tensor& x2,
                                 const at::Tensor& w_in, const std::optional<at::Tensor>& w_h, const at::Tensor& w_out,
                                 const at::Tensor& acts, int64_t depth, const std::array<bool, kNumGrads>& need,
                                 at::Tensor& gx2, at::Tensor& gw_in, at::Tensor& gb_in, at::Tensor& gw_h, at::Tensor& gb_h,
                                 at::Tensor& gw_out, at::Tensor& gb_out) {
  const int64_t M = x2.size(0), H = w_in.size(0), D_in = w_in.size(1), D_out = w_out.size(0);
  const bool hidden = depth > 0;
  const bool need_g = need[kX] || need[kWIn] || need[kBIn] || (hidden && (need[kWH] || need[kBH]));
  const auto options = x2.options().memory_format(at::MemoryFormat::Contiguous);
  const at::Tensor G = need_g ? at::empty({(depth + 1) * M, H}, options) : at::Tensor();
  const auto problem = [&](int64_t m, int64_t n, int64_t kk, gemm::View a, gemm::View b, void* c, int64_t ldc) {
    return gemm::product(m, n, kk, x2.scalar_type(), a, b, c, ldc);
  };

  // 1. The chain grad_out -> G_d -> ... -> G_0 (-> grad_x); ReLU's mask applied in each store.
  std::vector<gemm::Problem> chain;
  chain.reserve(depth + 2);
  if (need_g) {
    chain.push_back(problem(M, H, D_out, gemm::view_of(go), gemm::view_of(w_out), row_ptr(G, depth * M), H));
    chain.back().epi.mask_y = rows_view(acts, depth * M);
    for (int64_t l = depth; l >= 1; --l) {
      chain.push_back(problem(M, H, H, rows_view(G, l * M), gemm::view_of(*w_h), row_ptr(G, (l - 1) * M), H));
      chain.back().epi.mask_y = rows_view(acts, (l - 1) * M);
    }
    if (need[kX] && D_in > 0)
      chain.push_back(problem(M, D_in, H, rows_view(G, 0), gemm::view_of(w_in), gx2.data_ptr(), D_in));
  }
  // 2. Weight gradients: grad_w = G.T @ input of the layer; the hidden layer's d uses are one
  // GEMM whose reduction runs over all d * M rows (G and acts are stacked alike).
  std::vector<gemm::Problem> weights;
  weights.reserve(3);
  if (need[kWIn] && D_in > 0)
    weights.push_back(problem(H, D_in, M, transposed(rows_view(G, 0)), gemm::view_of(x2), gw_in.data_ptr(), D_in));
  if (hidden && need[kWH])
    weights.push_back(problem(H, H, depth * M, transposed(rows_view(G, M)), rows_view(acts, 0), gw_h.data_ptr(), H));
  if (need[kWOut])
    weights.push_back(problem(D_out, H, M, gemm::view_of_t(go), rows_view(acts, depth * M), gw_out.data_ptr(), H));

  // One packing region for every B: w_out, w_h (once for the whole chain), w_in, then the
  // weight gradients' inputs. chain[i] reads packed[chain_b[i]].
  std::vector<const gemm::Problem*> to_pack;
  std::vector<size_t> chain_b;
  for (size_t i = 0; i < chain.size(); ++i) {
    const bool reuses_w_h = i >= 2 && static_cast<int64_t>(i) <= depth;
    if (!reuses_w_h) to_pack.push_back(&chain[i]);
    chain_b.push_back(to_pack.size() - 1);
  }
  const size_t first_weight = to_pack.size();
  for (const auto& p : weights) to_pack.push_back(&p);
  double flops = 0;
  for (const gemm::Problem* p : to_pack) flops += 2.0 * p->M * p->N * p->K;
  flops += 2.0 * std::max<int64_t>(depth - 1, 0) * M * H * H;  // the hidden layers packed once
  const int64_t T = num_tasks(flops);
  const gemm::BPack pack(k, to_pack);
  std::vector<std::function<void(int64_t)>> phases = {[&](int64_t t) { pack.run(t, T); }};
  std::vector<const gemm::Problem*> layers;
  std::vector<gemm::PackedB> layer_b;
  for (size_t i = 0; i < chain.size(); ++i) {
    layers.push_back(&chain[i]);
    layer_b.push_back(pack[chain_b[i]]);
  }
  if (!chain.empty()) add_chain_phases(phases, k, layers, layer_b, M, T);

  // Weight gradients split by rows of each (hidden or output units), bias sums by units too:
  // each thread owns whole rows and whole bias columns, nothing is summed across threads.
  // All of it - packing, chain, weight gradients - is one parallel region (gemm::run_phases).
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), "dynamic_net_backward_cpu", [&] {
    phases.emplace_back([&](int64_t t) {
      for (size_t i = 0; i < weights.size(); ++i)
        gemm::compute(k, weights[i], pack[first_weight + i],
                      gemm::split(k, weights[i], pack[first_weight + i], t, T));
      const auto [u0, u1] = share(H, t, T);
      const auto [o0, o1] = share(D_out, t, T);
      const scalar_t* Gp = need_g ? G.const_data_ptr<scalar_t>() : nullptr;
      // The half types' bias sums on the engine's vector kernel: the same fp32 sums over the rows
      // in order as column_sums, which c10::Half's scalar conversions keep from vectorising.
      const auto sums = [&](const scalar_t* g, int64_t ld, int64_t rows, int64_t c0, int64_t c1, scalar_t* out) {
        if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
          column_sums(g, ld, rows, c0, c1, out);
        } else {
          k->column_sums(gemm::dtype_of(x2.scalar_type()), g, ld, nullptr, 0, rows, c0, c1, out);
        }
      };
      if (need[kBIn] && u1 > u0) sums(Gp, H, M, u0, u1, gb_in.data_ptr<scalar_t>() + u0);
      if (hidden && need[kBH] && u1 > u0) sums(Gp + M * H, H, depth * M, u0, u1, gb_h.data_ptr<scalar_t>() + u0);
      if (need[kBOut] && o1 > o0) sums(go.const_data_ptr<scalar_t>(), D_out, M, o0, o1, gb_out.data_ptr<scalar_t>() + o0);
    });
    gemm::run_phases(T, phases);
  });
}

// Multiply-adds of the network's largest layer product (gemm::kernels_for's choice).
double largest_product(int64_t M, int64_t D_in, int64_t H, int64_t D_out) {
  return double(M) * double(H) * double(std::max({D_in, H, D_out}));
}

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

  // A layer with no inputs (D_in or H == 0) returns its bias as stock's addmm does (the engine's
  // 0 + b would turn a -0 into +0): the ATen path below.
  const bool has_products = D_in > 0 && H > 0;
  if (const gemm::Kernels* k = has_products ? gemm::kernels_for(x.scalar_type(), largest_product(M, D_in, H, D_out))
                                             : nullptr) {
    at::Tensor out2 = out.view({M, D_out});
    dynamic_net_forward_engine(k, as_2d(x, M, D_in), w_in, b_in, w_h, b_h, w_out, b_out, depth, acts, out2);
    return {out, acts};
  }

  // The input layer, usually the largest GEMM, on all rows at once: the BLAS's own threading
  // splits it better than rows do (thresholds: net-input-layer-blas-threads).
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
  at::Tensor gx2 = need[kX] ? gx.view({M, D_in}) : gx;
  if (const gemm::Kernels* k = gemm::kernels_for(x.scalar_type(), largest_product(M, D_in, H, D_out))) {
    dynamic_net_backward_engine(k, go, x2, w_in, w_h, w_out, acts, depth, need, gx2, gw_in, gb_in, gw_h, gb_h,
                                gw_out, gb_out);
    return {gx, gw_in, gb_in, gw_h, gb_h, gw_out, gb_out};
  }
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
        at::Tensor g = rows_of(G, depth * M + r0, depth * M + r1);
        at::cpu::mm_out(g, rows_of(go, r0, r1), w_out);
        // ReLU's mask as stock's threshold_backward, in place (vectorised in every dtype).
        at::cpu::threshold_backward_out(g, g, rows_of(acts, depth * M + r0, depth * M + r1), 0);
        for (int64_t k = depth; k >= 1; --k) {
          at::Tensor below = rows_of(G, (k - 1) * M + r0, (k - 1) * M + r1);
          at::cpu::mm_out(below, g, *w_h);
          at::cpu::threshold_backward_out(below, below, rows_of(acts, (k - 1) * M + r0, (k - 1) * M + r1), 0);
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
