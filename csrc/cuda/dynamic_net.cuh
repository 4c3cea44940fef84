// CUDA kernels of dynnet::dynamic_net and dynnet::dynamic_net_backward (same semantics, outputs and
// errors as csrc/cpu/dynamic_net.cpp, whose header gives the formulas; G_k is the gradient at
// layer k's pre-activation, acts = [h_0; ..; h_d] and G are stacked the same way), with their
// host launchers. Compiled by nvcc through dynamic_net.cu, and by the host compiler for the CPU
// harness (harness/, runtime.cuh); included by exactly one translation unit of each build.
//
// Two paths (paths.h's choose_net: the table's net_one_launch_max_flops, DYNNET_EXT_CUDA_PATH):
// One-launch (H <= 256 and D_out <= 256, no empty dimension):
//   forward   net_forward_kernel      one launch: a block carries kRows batch rows through every
//                                     layer; the rows' activations stay in shared memory between
//                                     layers, and each h_k is also written to acts for the backward.
//   backward  net_backward_kernel     launch 1: per block of kRows rows, the chain grad_out -> G_d
//                                     -> .. -> G_0 (masked by acts) in shared memory, G written out,
//                                     and grad_x = G_0 @ w_in.
//             gemm_group_kernel       launch 2 (gemm.cuh): the three weight gradients as one grouped
//                                     GEMM (grad_w_in = G_0.T @ x, grad_w_h = [G_1..G_d].T @
//                                     [h_0..h_{d-1}], grad_w_out = grad_out.T @ h_d) and the three bias
//                                     gradients as column sums, in the same grid. The shared layer's d
//                                     uses are one reduction of length d * M. Every output element and
//                                     bias entry is reduced in a fixed order: bitwise reproducible.
// Chain (anything else, or forced vendor): the layer ops (linear_relu.cuh) in sequence, called
//   directly, each on its own path (custom or vendor by the layer rule): cuBLAS(Lt) GEMMs with
//   the bias epilogue per layer where the layers are large. The hidden layer's d weight
//   gradients are added up in use order, as stock's autograd accumulates them.
//
// Layer kernels inside a block (forward_layer / backward_layer): a block of 256 threads computes
// an (rows <= kRows) x N output. Thread t owns column c0 + t % cols and rows t / cols + i * groups,
// where cols is the smallest power of two >= N (>= 32, <= 256) and groups = 256 / cols: narrow
// layers put the spare threads on more rows. The input rows come from shared memory (broadcast
// reads: a warp shares one row). Weights pass through shared memory a slice of kSlice reduction
// indices at a time, loaded by all threads in groups of 4 consecutive elements (one 16-byte load
// for float32 where the rows allow it): forward weights (N, K) along K, transposed into sW[k][n]
// (odd row stride: no bank conflicts); backward weights (K, N) along N, as they lie. The forward
// loads the next slice into registers while it multiplies the current one: the input layer walks
// K = D_in in D_in / kSlice rounds, and a round trip to memory, not the FMAs, sets their pace.
//
// Precision: as gemm.cuh: accumulation in opmath (float for half types, double for double);
// every activation and gradient is rounded to the dtype where stock rounds it (each layer's
// output), and the next layer reads the rounded value. Bias gradients accumulate in
// acc_type<scalar_t, false> (double for float), as everywhere in dynnet.
//
// NaN: ReLU is `v < 0 ? 0 : v` (keeps NaN), the mask `h <= 0 ? 0 : g` (lets gradients through
// where h is NaN), as threshold_backward.
//
// Performance model (H200, float32, the seed's M = 64, D_in = 1000, H = 100, D_out = 10, depth 3;
// predictions, not measurements - dynnet_ext/gpu_model.py):
//   forward: 8 blocks (M / kRows); per block the input layer streams w_in (400 KB) from L2 in 32
//     rounds of 12.8 KB (latency-bound, ~0.35 us a round with the next slice in flight) and does
//     0.8 M FMA (~3 us of its SM at the achievable ~45% of FP32 peak); the hidden and output
//     layers add 4 + 4 rounds each: ~14 us in all, one launch (~2.5 us of host time).
//   backward: chain kernel ~6 us (8 blocks, 16 rounds of w_h/w_out slices), weight-gradient
//     group 1 launch of 41 split tiles + 8 column-sum blocks ~4 us: ~10 us in two launches.
//   Stock eager at this shape is host-bound (~40 launches, ~10 us of host time each): the fused
//   network's advantage is launches, which the 8-block grid does not give back.
//   At 4096 x 1024 -> 1024 the network does not fit the one-launch kernels (H > 256): chain.

#pragma once

#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "choose.cuh"
#include "gemm.cuh"
#include "ops.h"
#include "paths.h"
#include "runtime.cuh"

namespace dynnet {
namespace {

constexpr int kNetThreads = 256;
constexpr int kMaxWidth = static_cast<int>(paths::kNetMaxWidth);  // widest H and D_out of the one-launch path
constexpr int kRows = 8;        // batch rows per block (>= the 8 row groups of a 32-column layer)
constexpr int kSlice = 32;      // reduction indices per staged weight slice
constexpr int kSliceQuads = kSlice / 4;
constexpr int kFwdQuads = kMaxWidth * kSliceQuads / kNetThreads;  // a thread's quads of a forward slice
constexpr int kBwdQuads = kSlice * kMaxWidth / 4 / kNetThreads;   // .. of a backward slice (256 columns)
static_assert(kRows * kSliceQuads <= kNetThreads, "one quad of the x slice per thread");

template <typename scalar_t>
struct NetArgs {
  const scalar_t *x, *w_in, *b_in, *w_h, *b_h, *w_out, *b_out;
  const scalar_t* grad_out;  // backward
  scalar_t* acts;            // ((depth + 1) M, H): written by the forward, read by the backward
  scalar_t* out;             // forward: (M, D_out)
  scalar_t* G;               // backward: ((depth + 1) M, H)
  scalar_t* grad_x;          // backward, or nullptr
  int64_t M, D_in, H, D_out, depth;
  bool vec_x, vec_w_in, vec_w_h, vec_w_out;  // quad loads allowed (gemm.cuh's quad_loads_ok)
};

// Columns one pass of the block covers for an output of width n (<= 256): a power of two >= 32.
__device__ __forceinline__ int pass_cols(int64_t n) {
  int cols = 32;
  while (cols < n && cols < kNetThreads) cols *= 2;
  return cols;
}

// v = row[k .. k + 3], zero from `limit` on. vec: limit % 4 == 0, k % 4 == 0 and row aligned, so
// the quad is all in or all out and one vector load reads it.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_quad_upto(acc_t (&v)[4], const scalar_t* __restrict__ row, int64_t k,
                                               int64_t limit, bool vec) {
#pragma unroll
  for (int e = 0; e < 4; ++e) v[e] = acc_t(0);
  if (vec) {
    if (k < limit) load_quad(v, row + k);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (k + e < limit) v[e] = static_cast<acc_t>(row[k + e]);
  }
}

// out[r][c] = act(sum_k in[r][k] * W[c][k] + b[c]) for r < rows, c < N (<= 256); W: (N, K) global.
// The input is shared memory in_s (row stride ld_in, all K columns) or, with kGlobalIn, the
// global rows in_g (row stride K, for the input layer, whose K = D_in has no bound), staged a
// slice at a time in sX (kRows x kSlice). The result, rounded to scalar_t, goes to out_g (global,
// row stride N) and, widened back, to out_s (shared, row stride ld_out) unless out_s is null.
// sW: shared scratch of kSlice * (N | 1) elements. Thread t holds quads t + 256 i of the slice
// (quad e: weight row e / 8, k's 4 (e % 8) ..): the next slice's quads load while this one is used.
template <typename scalar_t, bool kGlobalIn, bool kRelu, typename acc_t>
__device__ void forward_layer(const acc_t* in_s, int ld_in, const scalar_t* __restrict__ in_g, bool vec_in, int rows,
                              int64_t K, const scalar_t* __restrict__ W, bool vec_w, const scalar_t* __restrict__ b,
                              int64_t N, acc_t* sW, acc_t* sX, acc_t* out_s, int ld_out, scalar_t* __restrict__ out_g) {
  const int tid = threadIdx.x;
  const int cols = pass_cols(N), groups = kNetThreads / cols, per_thread = kRows / groups;
  const int c = tid % cols, g = tid / cols;
  const int ldw = static_cast<int>(N) | 1;
  const int quads = static_cast<int>(N) * kSliceQuads;
  acc_t w_reg[kFwdQuads][4], x_reg[4];
  const auto load = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < kFwdQuads; ++i) {
      const int e = tid + i * kNetThreads;
      if (e < quads) load_quad_upto(w_reg[i], W + (e / kSliceQuads) * K, k0 + 4 * (e % kSliceQuads), K, vec_w);
    }
    if constexpr (kGlobalIn) {
      const int r = tid / kSliceQuads;
#pragma unroll
      for (int e = 0; e < 4; ++e) x_reg[e] = acc_t(0);
      if (tid < kRows * kSliceQuads && r < rows) load_quad_upto(x_reg, in_g + r * K, k0 + 4 * (tid % kSliceQuads), K, vec_in);
    }
  };

  acc_t acc[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) acc[i] = acc_t(0);
  if (K > 0) load(0);
  for (int64_t k0 = 0; k0 < K; k0 += kSlice) {
#pragma unroll
    for (int i = 0; i < kFwdQuads; ++i) {
      const int e = tid + i * kNetThreads;
      if (e < quads) {
        const int n = e / kSliceQuads, q = e % kSliceQuads;
#pragma unroll
        for (int j = 0; j < 4; ++j) sW[(4 * q + j) * ldw + n] = w_reg[i][j];
      }
    }
    if constexpr (kGlobalIn) {
      if (tid < kRows * kSliceQuads) {
#pragma unroll
        for (int j = 0; j < 4; ++j) sX[tid * 4 + j] = x_reg[j];  // = sX[r * kSlice + 4 q + j]
      }
    }
    __syncthreads();
    if (k0 + kSlice < K) load(k0 + kSlice);  // in flight during the FMAs below
    const int width = static_cast<int>(K - k0 < kSlice ? K - k0 : kSlice);
    if (c < N) {
      for (int kk = 0; kk < width; ++kk) {
        const acc_t w = sW[kk * ldw + c];
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          if (i < per_thread) {
            const int r = g + i * groups;  // one row per warp: a broadcast read
            const acc_t a = kGlobalIn ? sX[r * kSlice + kk] : in_s[r * ld_in + k0 + kk];
            acc[i] += a * w;
          }
        }
      }
    }
    __syncthreads();  // the next slice overwrites sW and sX
  }
  if (c < N) {
    const acc_t bias = static_cast<acc_t>(b[c]);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = g + i * groups;
      if (i < per_thread && r < rows) {
        acc_t v = acc[i] + bias;
        if constexpr (kRelu) v = v < acc_t(0) ? acc_t(0) : v;  // keeps NaN
        const scalar_t q = static_cast<scalar_t>(v);
        out_g[r * N + c] = q;
        if (out_s != nullptr) out_s[r * ld_out + c] = static_cast<acc_t>(q);
      }
    }
  }
  // No barrier here: the next layer reads out_s only after the barrier that ends its first slice's
  // staging, and nothing reads sW or sX after this layer's last slice barrier.
}

// out[r][c] = mask(r, c) * sum_k in[r][k] * W[k][c] for r < rows, c < N (any N: passes of up to
// 256 columns). in: shared, row stride ld_in; W: (K, N) global, staged kSlice rows x the pass's
// columns at a time in sW (row stride 256). With kMask, mask(r, c) is (h[r * N + c] <= 0 ? 0 : 1)
// from the global activations h. Output as in forward_layer.
template <typename scalar_t, bool kMask, typename acc_t>
__device__ void backward_layer(const acc_t* in_s, int ld_in, int rows, int64_t K, const scalar_t* __restrict__ W,
                               bool vec_w, int64_t N, const scalar_t* __restrict__ h, acc_t* sW, acc_t* out_s,
                               int ld_out, scalar_t* __restrict__ out_g) {
  const int tid = threadIdx.x;
  for (int64_t c0 = 0; c0 < N; c0 += kNetThreads) {
    const int64_t span = N - c0 < kNetThreads ? N - c0 : kNetThreads;
    const int cols = pass_cols(span), groups = kNetThreads / cols, per_thread = kRows / groups;
    const int cc = tid % cols, g = tid / cols;
    acc_t acc[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) acc[i] = acc_t(0);
    for (int64_t k0 = 0; k0 < K; k0 += kSlice) {
      // A warp loads 32 quads of one weight row: 128 consecutive elements.
#pragma unroll
      for (int i = 0; i < kBwdQuads; ++i) {
        const int e = tid + i * kNetThreads, kk = e / (kMaxWidth / 4), q = e % (kMaxWidth / 4);
        acc_t v[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
        if (k0 + kk < K) load_quad_upto(v, W + (k0 + kk) * N + c0, 4 * q, span, vec_w);
#pragma unroll
        for (int j = 0; j < 4; ++j) sW[kk * kMaxWidth + 4 * q + j] = v[j];
      }
      __syncthreads();
      const int width = static_cast<int>(K - k0 < kSlice ? K - k0 : kSlice);
      if (cc < span) {
        for (int kk = 0; kk < width; ++kk) {
          const acc_t w = sW[kk * kMaxWidth + cc];
#pragma unroll
          for (int i = 0; i < kRows; ++i)
            if (i < per_thread) acc[i] += in_s[(g + i * groups) * ld_in + k0 + kk] * w;
        }
      }
      __syncthreads();  // the next slice overwrites sW
    }
    if (cc < span) {
      const int64_t c = c0 + cc;
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int r = g + i * groups;
        if (i < per_thread && r < rows) {
          acc_t v = acc[i];
          if constexpr (kMask) v = static_cast<acc_t>(h[r * N + c]) <= acc_t(0) ? acc_t(0) : v;
          const scalar_t q = static_cast<scalar_t>(v);
          out_g[r * N + c] = q;
          if (out_s != nullptr) out_s[r * ld_out + c] = static_cast<acc_t>(q);
        }
      }
    }
  }
  // No barrier here either (as forward_layer): the next layer reads out_s after its first slice barrier.
}

// Shared memory of the one-launch kernels, in acc_t elements (see BlockState).
int64_t net_smem_elems(int64_t width, bool backward) {
  return 2 * kRows * width + (backward ? int64_t{kSlice} * kMaxWidth : kSlice * (width | 1) + kRows * kSlice);
}

// What a block of the one-launch kernels works on: its batch rows [row0, row0 + rows), and the
// shared memory carved into two activation buffers (kRows x width, ping-pong between layers),
// the weight slice sW and (forward) the x slice sX.
template <typename acc_t>
struct BlockState {
  int64_t row0;
  int rows, width;
  acc_t *cur, *nxt, *sW, *sX;
};

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ BlockState<acc_t> block_state(const NetArgs<scalar_t>& p) {
  BlockState<acc_t> b;
  b.row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  b.rows = static_cast<int>(p.M - b.row0 < kRows ? p.M - b.row0 : kRows);
  b.width = static_cast<int>(p.H > p.D_out ? p.H : p.D_out);
  b.cur = dynamic_smem<acc_t>();
  b.nxt = b.cur + kRows * b.width;
  b.sW = b.nxt + kRows * b.width;
  b.sX = b.sW + kSlice * (b.width | 1);  // forward only
  return b;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kNetThreads, 1) net_forward_kernel(const NetArgs<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  BlockState<acc_t> b = block_state<acc_t>(p);
  const int64_t M = p.M, H = p.H, row0 = b.row0;
  const int rows = b.rows, width = b.width;

  forward_layer<scalar_t, true, true, acc_t>(nullptr, 0, p.x + row0 * p.D_in, p.vec_x, rows, p.D_in, p.w_in,
                                             p.vec_w_in, p.b_in, H, b.sW, b.sX, b.cur, width, p.acts + row0 * H);
  for (int64_t k = 1; k <= p.depth; ++k) {
    forward_layer<scalar_t, false, true, acc_t>(b.cur, width, nullptr, false, rows, H, p.w_h, p.vec_w_h, p.b_h, H,
                                                b.sW, b.sX, b.nxt, width, p.acts + (k * M + row0) * H);
    acc_t* t = b.cur;
    b.cur = b.nxt;
    b.nxt = t;
  }
  forward_layer<scalar_t, false, false, acc_t>(b.cur, width, nullptr, false, rows, H, p.w_out, p.vec_w_out, p.b_out,
                                               p.D_out, b.sW, b.sX, nullptr, 0, p.out + row0 * p.D_out);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kNetThreads, 1) net_backward_kernel(const NetArgs<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const BlockState<acc_t> b = block_state<acc_t>(p);
  const int64_t M = p.M, H = p.H, d = p.depth, row0 = b.row0;
  const int rows = b.rows, width = b.width;
  acc_t *cur = b.cur, *nxt = b.nxt;

  for (int e = threadIdx.x; e < kRows * p.D_out; e += kNetThreads) {
    const int r = e / static_cast<int>(p.D_out);
    cur[r * width + e % p.D_out] = r < rows ? static_cast<acc_t>(p.grad_out[row0 * p.D_out + e]) : acc_t(0);
  }
  __syncthreads();
  // G_d = mask(h_d) . (grad_out @ w_out), then G_{k-1} = mask(h_{k-1}) . (G_k @ w_h).
  backward_layer<scalar_t, true, acc_t>(cur, width, rows, p.D_out, p.w_out, p.vec_w_out, H,
                                        p.acts + (d * M + row0) * H, b.sW, nxt, width, p.G + (d * M + row0) * H);
  for (int64_t k = d; k >= 1; --k) {
    acc_t* t = cur;
    cur = nxt;
    nxt = t;
    backward_layer<scalar_t, true, acc_t>(cur, width, rows, H, p.w_h, p.vec_w_h, H, p.acts + ((k - 1) * M + row0) * H,
                                          b.sW, nxt, width, p.G + ((k - 1) * M + row0) * H);
  }
  if (p.grad_x != nullptr) {  // grad_x = G_0 @ w_in, G_0 in nxt
    backward_layer<scalar_t, false, acc_t>(nxt, width, rows, H, p.w_in, p.vec_w_in, p.D_in, nullptr, b.sW, nullptr, 0,
                                           p.grad_x + row0 * p.D_in);
  }
}

// Output mask / result order of dynamic_net_backward.
enum Grad { kX, kWIn, kBIn, kWH, kBH, kWOut, kBOut, kNumGrads };

}  // namespace

std::tuple<at::Tensor, at::Tensor> dynamic_net_cuda(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                                                    const std::optional<at::Tensor>& w_h,
                                                    const std::optional<at::Tensor>& b_h, const at::Tensor& w_out,
                                                    const at::Tensor& b_out, int64_t depth) {
  check_dynamic_net_args(x, w_in, b_in, w_h, b_h, w_out, b_out, depth);
  const DeviceScope scope(x, "dynamic_net");
  count_kernel_call(KernelOp::DynamicNet, c10::DeviceType::CUDA);
  const int64_t D_in = w_in.size(1), H = w_in.size(0), D_out = w_out.size(0);
  const int64_t M = leading_rows(x);
  auto out_shape = x.sizes().vec();
  out_shape.back() = D_out;
  const auto options = x.options().memory_format(at::MemoryFormat::Contiguous);

  if (net_path(x.scalar_type(), M, D_in, H, D_out, depth) == paths::NetPath::Chain) {  // the layer ops
    const at::Tensor x2 = x.reshape({M, D_in});
    std::vector<at::Tensor> hs{linear_relu_cuda(x2, w_in, b_in, "relu")};
    for (int64_t k = 1; k <= depth; ++k) hs.push_back(linear_relu_cuda(hs.back(), *w_h, b_h, "relu"));
    at::Tensor out = new_output(out_shape, options);
    out.view({M, D_out}).copy_(linear_relu_cuda(hs.back(), w_out, b_out, "none"));
    return {out, at::cat(hs, 0)};
  }

  at::Tensor out = new_output(out_shape, options);
  at::Tensor acts = new_output({(depth + 1) * M, H}, options);
  const at::Tensor x2 = x.reshape({M, D_in}).contiguous();
  const at::Tensor wi = w_in.contiguous(), bi = b_in.contiguous(), wo = w_out.contiguous(), bo = b_out.contiguous();
  const at::Tensor wh = depth > 0 ? w_h->contiguous() : at::Tensor(), bh = depth > 0 ? b_h->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dynamic_net_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    NetArgs<scalar_t> p{};
    p.x = x2.const_data_ptr<scalar_t>();
    p.w_in = wi.const_data_ptr<scalar_t>(), p.b_in = bi.const_data_ptr<scalar_t>();
    p.w_h = depth > 0 ? wh.const_data_ptr<scalar_t>() : nullptr;
    p.b_h = depth > 0 ? bh.const_data_ptr<scalar_t>() : nullptr;
    p.w_out = wo.const_data_ptr<scalar_t>(), p.b_out = bo.const_data_ptr<scalar_t>();
    p.acts = acts.data_ptr<scalar_t>(), p.out = out.data_ptr<scalar_t>();
    p.M = M, p.D_in = D_in, p.H = H, p.D_out = D_out, p.depth = depth;
    p.vec_x = quad_loads_ok(p.x, D_in), p.vec_w_in = quad_loads_ok(p.w_in, D_in);
    p.vec_w_h = depth > 0 && quad_loads_ok(p.w_h, H), p.vec_w_out = quad_loads_ok(p.w_out, H);
    const size_t smem = net_smem_elems(std::max(H, D_out), /*backward=*/false) * sizeof(acc_t);
    allow_dynamic_smem<net_forward_kernel<scalar_t>>(smem);
    launch<net_forward_kernel<scalar_t>>(grid_1d(ceil_div<int64_t>(M, kRows), "dynamic_net"), kNetThreads, smem, p);
  });
  return {out, acts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dynamic_net_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_in,
                          const std::optional<at::Tensor>& w_h, const at::Tensor& w_out, const at::Tensor& acts,
                          int64_t depth, std::array<bool, kNumGrads> need) {
  check_dynamic_net_backward_args(grad_out, x, w_in, w_h, w_out, acts, depth);
  const DeviceScope scope(x, "dynamic_net_backward");
  count_kernel_call(KernelOp::DynamicNetBackward, c10::DeviceType::CUDA);
  const int64_t D_in = w_in.size(1), H = w_in.size(0), D_out = w_out.size(0);
  const int64_t M = leading_rows(x);
  const auto options = x.options().memory_format(at::MemoryFormat::Contiguous);
  const auto empty = [&] { return at::empty({0}, options); };
  const at::Tensor go = grad_out.reshape({M, D_out}).contiguous();
  const at::Tensor x2 = x.reshape({M, D_in}).contiguous();
  const at::Tensor a = acts.contiguous();
  const auto h = [&](int64_t k) { return a.narrow(0, k * M, M); };
  // The op's outputs, each gradient not asked for as an empty (0,) tensor.
  const auto outputs = [&](const at::Tensor& gx, const at::Tensor& gw_in, const at::Tensor& gb_in,
                           const at::Tensor& gw_h, const at::Tensor& gb_h, const at::Tensor& gw_out,
                           const at::Tensor& gb_out) {
    const auto keep = [&](Grad i, const at::Tensor& t) { return need[i] ? t : empty(); };
    return std::make_tuple(keep(kX, gx), keep(kWIn, gw_in), keep(kBIn, gb_in), keep(kWH, gw_h), keep(kBH, gb_h),
                           keep(kWOut, gw_out), keep(kBOut, gb_out));
  };

  if (net_path(x.scalar_type(), M, D_in, H, D_out, depth) == paths::NetPath::Chain) {  // the layer ops
    auto [gh, gw_out, gb_out] =
        linear_relu_backward_cuda(go, h(depth), w_out, std::nullopt, "none", {true, need[kWOut], need[kBOut]});
    at::Tensor gw_h = at::zeros({H, H}, options), gb_h = at::zeros({H}, options);
    for (int64_t k = depth; k >= 1; --k) {
      auto [g, gw, gb] = linear_relu_backward_cuda(gh, h(k - 1), *w_h, h(k), "relu", {true, true, true});
      gw_h.add_(gw);
      gb_h.add_(gb);
      gh = g;
    }
    auto [gx, gw_in, gb_in] = linear_relu_backward_cuda(gh, x2, w_in, h(0), "relu", {need[kX], need[kWIn], need[kBIn]});
    return outputs(need[kX] ? gx.reshape(x.sizes()) : gx, gw_in, gb_in, gw_h, gb_h, gw_out, gb_out);
  }

  // Every gradient is computed in the two launches (the weight gradients share one grouped
  // launch, so leaving one out saves next to nothing); those not asked for are dropped.
  at::Tensor G = new_output({(depth + 1) * M, H}, options);
  at::Tensor gx = need[kX] ? new_output(x.sizes(), options) : empty();
  at::Tensor gw_in = new_output({H, D_in}, options), gb_in = new_output({H}, options);
  at::Tensor gw_h = new_output({H, H}, options), gb_h = new_output({H}, options);
  at::Tensor gw_out = new_output({D_out, H}, options), gb_out = new_output({D_out}, options);
  const at::Tensor wi = w_in.contiguous(), wo = w_out.contiguous();
  const at::Tensor wh = depth > 0 ? w_h->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dynamic_net_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    NetArgs<scalar_t> p{};
    p.w_in = wi.const_data_ptr<scalar_t>(), p.w_out = wo.const_data_ptr<scalar_t>();
    p.w_h = depth > 0 ? wh.const_data_ptr<scalar_t>() : nullptr;
    p.grad_out = go.const_data_ptr<scalar_t>();
    p.acts = const_cast<scalar_t*>(a.const_data_ptr<scalar_t>());  // read only in the backward
    p.G = G.data_ptr<scalar_t>();
    p.grad_x = need[kX] ? gx.data_ptr<scalar_t>() : nullptr;
    p.M = M, p.D_in = D_in, p.H = H, p.D_out = D_out, p.depth = depth;
    p.vec_w_in = quad_loads_ok(p.w_in, D_in), p.vec_w_h = depth > 0 && quad_loads_ok(p.w_h, H);
    p.vec_w_out = quad_loads_ok(p.w_out, H);
    const size_t smem = net_smem_elems(std::max(H, D_out), /*backward=*/true) * sizeof(acc_t);
    allow_dynamic_smem<net_backward_kernel<scalar_t>>(smem);
    launch<net_backward_kernel<scalar_t>>(grid_1d(ceil_div<int64_t>(M, kRows), "dynamic_net_backward"), kNetThreads,
                                          smem, p);

    // grad_w = sum over rows l of G[l][i] * act[l][j] (GradWeight: A = G rows, B = activations),
    // grad_b = column sums of the same G rows. At depth 0 the hidden layer's reduction is empty:
    // zeros.
    const scalar_t* Gp = G.const_data_ptr<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    GemmGroupBuilder<scalar_t> group;
    group.gemm(Role::GradWeight, Gp, nullptr, x2.const_data_ptr<scalar_t>(), nullptr, gw_in.data_ptr<scalar_t>(), H,
               D_in, M, false);
    group.gemm(Role::GradWeight, Gp + M * H, nullptr, ap, nullptr, gw_h.data_ptr<scalar_t>(), H, H, depth * M, false);
    group.gemm(Role::GradWeight, go.const_data_ptr<scalar_t>(), nullptr, ap + depth * M * H, nullptr,
               gw_out.data_ptr<scalar_t>(), D_out, H, M, false);
    group.colsum(Gp, nullptr, gb_in.data_ptr<scalar_t>(), M, H, false);
    group.colsum(Gp + M * H, nullptr, gb_h.data_ptr<scalar_t>(), depth * M, H, false);
    group.colsum(go.const_data_ptr<scalar_t>(), nullptr, gb_out.data_ptr<scalar_t>(), M, D_out, false);
    group.run();
  });
  return outputs(gx, gw_in, gb_in, gw_h, gb_h, gw_out, gb_out);
}

}  // namespace dynnet
