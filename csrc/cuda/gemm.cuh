// The tiled GEMM behind the CUDA kernels (see linear_relu.cuh's header for the roles, the work
// split and the precision rules); shared by linear_relu.cuh and dynamic_net.cuh.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/OpMathType.h>

#include "../common.h"
#include "runtime.cuh"

namespace dynnet {

constexpr int kBM = 64;                          // C rows per block
constexpr int kBN = 64;                          // C columns per block
// A reduction slice of 32 halves the serial load-then-multiply rounds of a slice of 16: at the
// seed's shapes (K = 1000, only 2-4 blocks) that round trip, not FLOPs, sets the time.
constexpr int kBK = 32;                          // reduction slice per shared-memory round
constexpr int kTM = 4, kTN = 4;                  // outputs per thread (rows x columns)
constexpr int kThreadsX = kBN / kTN;             // 16
constexpr int kThreadsY = kBM / kTM;             // 16
constexpr int kThreads = kThreadsX * kThreadsY;  // 256
// Row padding of the shared tiles: a reduction-contiguous load has a warp store 32 consecutive l
// of one row o, i.e. s[0..31][o]; a row stride of 65 words puts those 32 stores in 32 banks.
constexpr int kPad = 1;
static_assert(kBM * kBK % kThreads == 0 && kBN * kBK % kThreads == 0, "tile loads must split evenly");
static_assert(kBM <= kThreads, "grad_bias needs one thread per tile row");

enum class Role { Forward, GradInput, GradWeight };

// Whether A / B of a role have the reduction index l as their fastest index (see the table above).
constexpr bool a_reduction_contiguous(Role r) { return r != Role::GradWeight; }
constexpr bool b_reduction_contiguous(Role r) { return r == Role::Forward; }

template <typename scalar_t>
struct GemmArgs {
  const scalar_t* a;     // A's storage: x2 (Forward) or grad_y (backward)
  const scalar_t* y;     // the forward output, same layout as grad_y: the ReLU mask (backward)
  const scalar_t* b;     // B's storage: weight or x2
  const scalar_t* bias;  // Forward with bias: added in the epilogue
  scalar_t* c;           // C, rows x cols, contiguous
  scalar_t* bias_grad;   // GradWeight with bias: column sums of g, length rows
  int64_t rows, cols, red;
  int64_t row_tiles;
};

// Tile loads. The (kW x kBK) tile of an operand (kW output indices from o0, kBK reduction indices
// from k0) is read by all 256 threads, kW * kBK / kThreads elements each. The operand is
// (extent x red) if kRedContig, else (red x extent), row-major and contiguous. A thread keeps one
// index along the operand's contiguous dimension ("lane") and strides kStep rows down the other,
// so a warp reads consecutive addresses and each thread needs one base pointer plus a constant
// row step - cheap in registers next to a 64-bit index per element.
template <int kW>
constexpr int kLoads = kW * kBK / kThreads;

template <int kW, bool kRedContig>
struct TileMap {
  static constexpr int kLanes = kRedContig ? kBK : kW;  // threads along the contiguous dimension
  static constexpr int kStep = kThreads / kLanes;       // rows covered by one pass of all threads
  static_assert(kThreads % kLanes == 0, "a pass must cover whole rows");
};

// Reads this thread's elements of the tile into registers, zero outside the matrix. With kMask
// an element is zeroed where the same element of y is <= 0 (kept where y is NaN).
template <int kW, bool kRedContig, bool kMask, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(acc_t (&reg)[kLoads<kW>], const scalar_t* __restrict__ p,
                                          const scalar_t* __restrict__ y, int64_t extent, int64_t red,
                                          int64_t o0, int64_t k0, int tid) {
  using Map = TileMap<kW, kRedContig>;
  const int lane = tid % Map::kLanes, first = tid / Map::kLanes;
  const int64_t row_len = kRedContig ? red : extent;  // the operand's contiguous dimension
  const int64_t rows = kRedContig ? extent : red;
  const int64_t col = (kRedContig ? k0 : o0) + lane;
  const int64_t row = (kRedContig ? o0 : k0) + first;
  const int64_t offset = row * row_len + col;
  const int64_t step = Map::kStep * row_len;
  const bool col_ok = col < row_len;
#pragma unroll
  for (int i = 0; i < kLoads<kW>; ++i) {
    acc_t v = acc_t(0);
    if (col_ok && row + i * Map::kStep < rows) {
      v = static_cast<acc_t>(p[offset + i * step]);
      if constexpr (kMask) v = static_cast<acc_t>(y[offset + i * step]) <= acc_t(0) ? acc_t(0) : v;
    }
    reg[i] = v;
  }
}

// Writes what load_tile read (same thread-to-element map) into the shared tile s[k][o].
template <int kW, bool kRedContig, typename acc_t>
__device__ __forceinline__ void store_tile(acc_t (*s)[kW + kPad], const acc_t (&reg)[kLoads<kW>], int tid) {
  using Map = TileMap<kW, kRedContig>;
  const int lane = tid % Map::kLanes, first = tid / Map::kLanes;
#pragma unroll
  for (int i = 0; i < kLoads<kW>; ++i) {
    const int strided = first + i * Map::kStep;
    if constexpr (kRedContig) {
      s[lane][strided] = reg[i];  // lane is the reduction index k
    } else {
      s[strided][lane] = reg[i];  // lane is the output index o
    }
  }
}

// kRelu: Forward applies ReLU in the epilogue; the backward roles mask grad_y where y <= 0.
// kBias: Forward adds bias; GradWeight also writes grad_bias; GradInput ignores it.
// One 64 x 64 tile of C, `tile` numbering the tiles column-major (row tiles fastest). Called by
// every thread of a 256-thread block.
template <typename scalar_t, Role kRole, bool kRelu, bool kBias>
__device__ __forceinline__ void gemm_tile(const GemmArgs<scalar_t>& p, int64_t tile) {
  using acc_t = at::opmath_type<scalar_t>;
  using bias_acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  constexpr bool kARed = a_reduction_contiguous(kRole);
  constexpr bool kBRed = b_reduction_contiguous(kRole);
  constexpr bool kMaskA = kRelu && kRole != Role::Forward;

  __shared__ acc_t As[kBK][kBM + kPad];
  __shared__ acc_t Bs[kBK][kBN + kPad];

  const int tid = threadIdx.x;
  const int tx = tid % kThreadsX, ty = tid / kThreadsX;
  const int64_t tile_r = tile % p.row_tiles, tile_c = tile / p.row_tiles;
  const int64_t r0 = tile_r * kBM, c0 = tile_c * kBN;
  // Column tile 0 of grad_weight covers every reduction slice of its rows exactly once: the
  // natural owner of grad_bias for those rows, summed from the masked A tiles already in shared memory.
  const bool sum_bias = kRole == Role::GradWeight && kBias && tile_c == 0 && tid < kBM;

  acc_t acc[kTM][kTN];
#pragma unroll
  for (int i = 0; i < kTM; ++i)
#pragma unroll
    for (int j = 0; j < kTN; ++j) acc[i][j] = acc_t(0);
  bias_acc_t bias_sum = bias_acc_t(0);

  acc_t a_reg[kLoads<kBM>], b_reg[kLoads<kBN>];
  const int64_t slices = ceil_div<int64_t>(p.red, kBK);
  if (slices > 0) {
    load_tile<kBM, kARed, kMaskA>(a_reg, p.a, p.y, p.rows, p.red, r0, 0, tid);
    load_tile<kBN, kBRed, false>(b_reg, p.b, p.b, p.cols, p.red, c0, 0, tid);
  }
  for (int64_t s = 0; s < slices; ++s) {
    store_tile<kBM, kARed>(As, a_reg, tid);
    store_tile<kBN, kBRed>(Bs, b_reg, tid);
    __syncthreads();
    if (s + 1 < slices) {  // the next slice's global loads overlap this slice's FMAs
      const int64_t k0 = (s + 1) * kBK;
      load_tile<kBM, kARed, kMaskA>(a_reg, p.a, p.y, p.rows, p.red, r0, k0, tid);
      load_tile<kBN, kBRed, false>(b_reg, p.b, p.b, p.cols, p.red, c0, k0, tid);
    }
    if (sum_bias) {
#pragma unroll
      for (int k = 0; k < kBK; ++k) bias_sum += static_cast<bias_acc_t>(As[k][tid]);
    }
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      acc_t a[kTM], b[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) a[i] = As[k][ty + i * kThreadsY];
#pragma unroll
      for (int j = 0; j < kTN; ++j) b[j] = Bs[k][tx + j * kThreadsX];
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] += a[i] * b[j];  // contracted to FMA (-fmad=true)
    }
    __syncthreads();  // the next round overwrites the tiles
  }

#pragma unroll
  for (int j = 0; j < kTN; ++j) {
    const int64_t col = c0 + tx + j * kThreadsX;
    if (col >= p.cols) continue;
    acc_t add = acc_t(0);
    if constexpr (kRole == Role::Forward && kBias) add = static_cast<acc_t>(p.bias[col]);
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int64_t row = r0 + ty + i * kThreadsY;
      if (row >= p.rows) continue;
      acc_t v = acc[i][j];
      if constexpr (kRole == Role::Forward && kBias) v += add;
      if constexpr (kRole == Role::Forward && kRelu) v = v < acc_t(0) ? acc_t(0) : v;  // keeps NaN
      p.c[row * p.cols + col] = static_cast<scalar_t>(v);
    }
  }
  if (sum_bias && r0 + tid < p.rows) p.bias_grad[r0 + tid] = static_cast<scalar_t>(bias_sum);
}

// __launch_bounds__(256, 2) lets ptxas use up to 128 registers a thread (2 blocks per SM): with
// the bound on threads alone it settled at 64 in some variants and spilled; with it none spill.
template <typename scalar_t, Role kRole, bool kRelu, bool kBias>
__global__ void __launch_bounds__(kThreads, 2) gemm_kernel(const GemmArgs<scalar_t> p) {
  gemm_tile<scalar_t, kRole, kRelu, kBias>(p, blockIdx.x);
}

}  // namespace dynnet
