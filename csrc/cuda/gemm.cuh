// The project's CUDA GEMM: the custom path of the layer ops (linear_relu.cuh) and the weight
// gradients of the network's one-launch backward (dynamic_net.cuh). One kernel runs a group of
// up to kMaxProblems problems, each block one tile of one of them, so a layer's whole backward
// (grad_x, grad_weight, grad_bias) or the network's six weight and bias gradients are ONE launch.
//
// Problems (row-major, contiguous operands; g = (y <= 0 ? 0 : grad_y) when masked, else grad_y):
//   role        C        rows cols red   A(i, l)       B(l, j)        epilogue
//   Forward     y        M    N    K     x2[i, l]      weight[j, l]   + bias[j], ReLU (v < 0 ? 0 : v)
//   GradInput   grad_x   M    K    N     g[i, l]       weight[l, j]   -
//   GradWeight  grad_w   N    K    M     g[l, i]       x2[l, j]       -
//   ColSum      out      -    cols red   -             -              out[j] = sum_l g[l, j]
// An operand is "reduction-contiguous" (l its fastest index: A of Forward and GradInput, B of
// Forward) or "output-contiguous"; loads walk the contiguous index fastest either way (coalesced)
// and store to shared memory as s[l][i], so the inner product is one piece of code.
//
// Tiles (one block = 256 threads = 8 warps):
//   WideTile   64 x 64 of C, the reduction walked by the whole block in slices of 32; thread
//              (tx, ty) of a 16 x 16 grid owns 4 x 4 outputs (ty + 16 i, tx + 16 j): strided
//              ownership makes every shared read a broadcast (A) or 16 consecutive words (B).
//   SplitTile  16 x 16 of C, the reduction split into 8 contiguous chunks, one per warp (each
//              walks its chunk in slices of 32 with its own shared staging), the 8 partial
//              tiles then summed in shared memory in warp order - fixed, so the result is
//              bitwise reproducible; lane (tx, ty) of a 4 x 8 grid owns 2 x 4 outputs.
// The host takes WideTile when the problems have at least paths::Table::wide_tile_min_tiles
// 64 x 64 tiles (default 132, one per SM), else SplitTile: at the seed's 64 x 1000 -> 100 the
// forward is 2 wide tiles (2 SMs busy, each walking 32 slices) but 28 split tiles, each warp
// walking 4 slices. Every thread loads its share of a slice in groups of 4 consecutive elements
// (one 16-byte load for float32, 8 bytes for half types, two 16-byte loads for float64) when the
// operand's rows are a multiple of 4 elements and its base is aligned (Problem::vec_*), else as
// 4 scalar loads; the next slice is loaded into registers while the current one is multiplied.
// ColSum blocks own 32 columns: lane = column (coalesced), the 8 warps take rows w, w + 8, ..
// in order, then their partials are added in warp order: again a fixed order, no atomics.
//
// Precision: accumulation in at::opmath_type (double for float64, float otherwise; half types are
// widened as loaded, shared memory holds float). float32 is FP32 FMA whatever torch's TF32 setting
// (at least as exact as stock); column sums (grad_bias) accumulate in at::acc_type<scalar_t,
// false> (double for float32, as the CPU kernels do: a float running sum over 1e5 rows drifts by
// ~1e-4). No tensor cores: this path runs where time is latency, not FLOPs (see the model below
// and paths.h); half-type GEMMs that are FLOP-bound go to cuBLAS.
//
// NaN as stock: ReLU is `v < 0 ? 0 : v` (keeps NaN; fmaxf(NaN, 0) would give 0), the mask
// `y <= 0 ? 0 : g` lets the gradient through where y is NaN, as threshold_backward does.
//
// Performance model (H200: 132 SMs, 67 TFLOP/s FP32 FMA = 0.51 per SM, 4.3 TB/s HBM, ~127 GB/s
// L2 to one SM, ~0.4 us a slice round trip when latency-bound; predictions, not measurements -
// dynnet_ext/gpu_model.py computes them; scripts/gpu_check.sh measures):
//   shape (M x K -> N), float32      blocks  slices/chain  FLOPs     bytes (HBM)  predicted  bound
//   forward 64 x 1000 -> 100         28 S    4             12.8 M    0.69 MB      3.8 us     chain + launch
//   forward 64 x 100 -> 100          28 S    1             1.3 M     0.09 MB      2.6 us     launch
//   backward 64 x 1000 -> 100 (1 l.) 693 S   1             25.6 M    1.1 MB       3.5 us     launch + L2
//   forward 4096 x 1024 -> 1024      1024 W  32            8.6 G     25 MB        290 us     FP32 FMA (~45% of peak)
//   backward 4096 x 1024 -> 1024     2048 W  32/128        17.2 G    50 MB        580 us     FP32 FMA
// (S = SplitTile, W = WideTile; a launch also costs ~2.5 us on the host.) At 4096 x 1024 x 1024
// cuBLAS is predicted at ~190 us in FP32 and ~20 us in bfloat16 (tensor cores): the dispatch
// sends such shapes to the vendor path (paths.h).
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../common.h"
#include "paths.h"
#include "runtime.cuh"

namespace dynnet {

constexpr int kThreads = 256;  // every GEMM block
constexpr int kWarps = kThreads / 32;
constexpr int kColSumCols = 32;  // columns of one ColSum block (one per lane)

struct WideTile {
  static constexpr int kBM = 64, kBN = 64, kBK = 32, kGroups = 1, kTM = 4, kTN = 4;
};
struct SplitTile {
  static constexpr int kBM = 16, kBN = 16, kBK = 32, kGroups = 8, kTM = 2, kTN = 4;
};

// What follows from a tile shape. Shared rows are padded by one word: a reduction-contiguous
// store of 4 k's into s[k][o] then spreads a warp's 32 stores over 32 banks.
template <class T>
struct TileDims : T {
  static constexpr int kGroupThreads = kThreads / T::kGroups;
  static constexpr int kThreadsX = T::kBN / T::kTN, kThreadsY = T::kBM / T::kTM;
  static constexpr int kStageA = T::kBK * (T::kBM + 1), kStageB = T::kBK * (T::kBN + 1);
  static constexpr int kStage = kStageA + kStageB;  // one group's staging, in acc_t elements
  static_assert(kThreadsX * kThreadsY == kGroupThreads, "each thread of a group owns kTM x kTN outputs");
  static_assert(T::kGroups == 1 || T::kBM * T::kBN == kThreads, "the group reduction gives each thread one output");
};

enum class Role : int32_t { Forward, GradInput, GradWeight, ColSum };

constexpr bool a_reduction_contiguous(Role r) { return r != Role::GradWeight; }
constexpr bool b_reduction_contiguous(Role r) { return r == Role::Forward; }

template <typename scalar_t>
struct Problem {
  const scalar_t* a;     // A (ColSum: the summed matrix, red x cols)
  const scalar_t* y;     // the ReLU mask's source, laid out as a (masked roles with relu)
  const scalar_t* b;     // B
  const scalar_t* bias;  // Forward: added in the epilogue, or null
  scalar_t* c;           // C, rows x cols, contiguous (ColSum: cols sums)
  int64_t rows, cols, red;
  int64_t row_tiles;     // set by GemmGroupBuilder::run
  Role role;
  bool relu;             // Forward: ReLU epilogue. Other roles: mask a where y <= 0
  bool vec_a, vec_b;     // 4-element vector loads allowed (rows of a multiple of 4, base aligned)
};

constexpr int kMaxProblems = 6;

// The problems of one launch; problem q owns blocks [first[q], first[q + 1]).
template <typename scalar_t>
struct GemmGroup {
  Problem<scalar_t> p[kMaxProblems];
  int64_t first[kMaxProblems + 1];
  int count;
};

// ---- loads --------------------------------------------------------------------------------------

// 4 consecutive elements at p (aligned for the vector width) into v, widened to acc_t.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_quad(acc_t (&v)[4], const scalar_t* __restrict__ p) {
  if constexpr (sizeof(scalar_t) == 8) {
    const double2 lo = *reinterpret_cast<const double2*>(p), hi = *reinterpret_cast<const double2*>(p + 2);
    v[0] = lo.x, v[1] = lo.y, v[2] = hi.x, v[3] = hi.y;
  } else if constexpr (sizeof(scalar_t) == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    const float2 q = *reinterpret_cast<const float2*>(p);  // 4 half-type values: 8 bytes
    scalar_t h[4];
    memcpy(h, &q, sizeof(h));
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = static_cast<acc_t>(h[e]);
  }
}

// The thread map of one operand tile (kW output indices x kBK reduction indices) over a group's
// threads: lanes along the operand's contiguous dimension, one quad (4 elements) each, kStep
// rows per pass of the group, kPasses passes.
template <int kW, bool kRedContig, class T>
struct OperandMap {
  static constexpr int kContig = kRedContig ? T::kBK : kW;
  static constexpr int kQuads = kContig / 4;
  static constexpr int kStep = TileDims<T>::kGroupThreads / kQuads;
  static constexpr int kRows = kRedContig ? kW : T::kBK;
  static constexpr int kPasses = kRows / kStep;
  static_assert(kContig % 4 == 0 && TileDims<T>::kGroupThreads % kQuads == 0 && kRows % kStep == 0,
                "a tile must split evenly into quads");
};

// Reads thread t's quads of the tile whose output indices start at o0 and reduction indices at
// k0; zero outside the operand. With y, an element is zeroed where y's is <= 0 (kept where NaN).
template <int kW, bool kRedContig, class T, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_operand(acc_t (&reg)[OperandMap<kW, kRedContig, T>::kPasses][4],
                                             const scalar_t* __restrict__ p, const scalar_t* __restrict__ y, bool vec,
                                             int64_t extent, int64_t red, int64_t o0, int64_t k0, int t) {
  using Map = OperandMap<kW, kRedContig, T>;
  const int q = t % Map::kQuads, first = t / Map::kQuads;
  const int64_t row_len = kRedContig ? red : extent;  // the operand's contiguous dimension
  const int64_t rows = kRedContig ? extent : red;
  const int64_t col = (kRedContig ? k0 : o0) + 4 * q;
  const int64_t row = (kRedContig ? o0 : k0) + first;
#pragma unroll
  for (int i = 0; i < Map::kPasses; ++i) {
    const int64_t r = row + static_cast<int64_t>(i) * Map::kStep;
    acc_t v[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    if (r < rows) {
      const int64_t offset = r * row_len + col;
      if (vec) {  // row_len % 4 == 0 and col % 4 == 0: the quad is all in or all out
        if (col < row_len) {
          load_quad(v, p + offset);
          if (y != nullptr) {
            acc_t m[4];
            load_quad(m, y + offset);
#pragma unroll
            for (int e = 0; e < 4; ++e) v[e] = m[e] <= acc_t(0) ? acc_t(0) : v[e];
          }
        }
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (col + e < row_len) {
            v[e] = static_cast<acc_t>(p[offset + e]);
            if (y != nullptr) v[e] = static_cast<acc_t>(y[offset + e]) <= acc_t(0) ? acc_t(0) : v[e];
          }
        }
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) reg[i][e] = v[e];
  }
}

// Writes what load_operand read (the same thread-to-element map) into the shared tile s[k][o].
template <int kW, bool kRedContig, class T, typename acc_t>
__device__ __forceinline__ void store_operand(acc_t (*s)[kW + 1],
                                              const acc_t (&reg)[OperandMap<kW, kRedContig, T>::kPasses][4], int t) {
  using Map = OperandMap<kW, kRedContig, T>;
  const int q = t % Map::kQuads, first = t / Map::kQuads;
#pragma unroll
  for (int i = 0; i < Map::kPasses; ++i) {
    const int strided = first + i * Map::kStep;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if constexpr (kRedContig) {
        s[4 * q + e][strided] = reg[i][e];  // the quad runs along k
      } else {
        s[strided][4 * q + e] = reg[i][e];  // the quad runs along o
      }
    }
  }
}

// ---- one tile ---------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_output(const Problem<scalar_t>& p, int64_t row, int64_t col, acc_t v,
                                             bool forward) {
  if (row >= p.rows || col >= p.cols) return;
  if (forward) {
    if (p.bias != nullptr) v += static_cast<acc_t>(p.bias[col]);
    if (p.relu) v = v < acc_t(0) ? acc_t(0) : v;  // keeps NaN
  }
  p.c[row * p.cols + col] = static_cast<scalar_t>(v);
}

// One kBM x kBN tile of C (`tile` numbers the tiles column-major, row tiles fastest, so
// consecutive blocks share a column tile of B in L2). Called by all 256 threads of the block;
// smem: the block's dynamic shared memory (gemm_smem_bytes).
template <typename scalar_t, class T, Role kRole>
__device__ __forceinline__ void gemm_tile(const Problem<scalar_t>& p, int64_t tile, at::opmath_type<scalar_t>* smem) {
  using acc_t = at::opmath_type<scalar_t>;
  using D = TileDims<T>;
  constexpr bool kARed = a_reduction_contiguous(kRole), kBRed = b_reduction_contiguous(kRole);
  using MapA = OperandMap<T::kBM, kARed, T>;
  using MapB = OperandMap<T::kBN, kBRed, T>;

  const int tid = threadIdx.x, group = tid / D::kGroupThreads, t = tid % D::kGroupThreads;
  const int tx = t % D::kThreadsX, ty = t / D::kThreadsX;
  const int64_t r0 = (tile % p.row_tiles) * T::kBM, c0 = (tile / p.row_tiles) * T::kBN;
  acc_t(*As)[T::kBM + 1] = reinterpret_cast<acc_t(*)[T::kBM + 1]>(smem + group * D::kStage);
  acc_t(*Bs)[T::kBN + 1] = reinterpret_cast<acc_t(*)[T::kBN + 1]>(smem + group * D::kStage + D::kStageA);
  const scalar_t* mask = kRole != Role::Forward && p.relu ? p.y : nullptr;

  // This group's contiguous chunk of the reduction: slices [first_slice, first_slice + slices).
  // Every group runs the same number of rounds (the block's barriers are shared); a slice past
  // the end loads zeros.
  const int64_t all_slices = ceil_div<int64_t>(p.red, T::kBK);
  const int64_t slices = ceil_div<int64_t>(all_slices, T::kGroups);
  const int64_t k_first = group * slices * T::kBK;

  acc_t acc[T::kTM][T::kTN];
#pragma unroll
  for (int i = 0; i < T::kTM; ++i)
#pragma unroll
    for (int j = 0; j < T::kTN; ++j) acc[i][j] = acc_t(0);

  acc_t a_reg[MapA::kPasses][4], b_reg[MapB::kPasses][4];
  if (slices > 0) {
    load_operand<T::kBM, kARed, T>(a_reg, p.a, mask, p.vec_a, p.rows, p.red, r0, k_first, t);
    load_operand<T::kBN, kBRed, T>(b_reg, p.b, static_cast<const scalar_t*>(nullptr), p.vec_b, p.cols, p.red, c0,
                                   k_first, t);
  }
  for (int64_t s = 0; s < slices; ++s) {
    store_operand<T::kBM, kARed, T>(As, a_reg, t);
    store_operand<T::kBN, kBRed, T>(Bs, b_reg, t);
    __syncthreads();
    if (s + 1 < slices) {  // the next slice's loads are in flight during this slice's FMAs
      const int64_t k0 = k_first + (s + 1) * T::kBK;
      load_operand<T::kBM, kARed, T>(a_reg, p.a, mask, p.vec_a, p.rows, p.red, r0, k0, t);
      load_operand<T::kBN, kBRed, T>(b_reg, p.b, static_cast<const scalar_t*>(nullptr), p.vec_b, p.cols, p.red, c0,
                                     k0, t);
    }
#pragma unroll
    for (int k = 0; k < T::kBK; ++k) {
      acc_t a[T::kTM], b[T::kTN];
#pragma unroll
      for (int i = 0; i < T::kTM; ++i) a[i] = As[k][ty + i * D::kThreadsY];
#pragma unroll
      for (int j = 0; j < T::kTN; ++j) b[j] = Bs[k][tx + j * D::kThreadsX];
#pragma unroll
      for (int i = 0; i < T::kTM; ++i)
#pragma unroll
        for (int j = 0; j < T::kTN; ++j) acc[i][j] += a[i] * b[j];  // contracted to FMA (-fmad=true)
    }
    __syncthreads();  // the next round overwrites the tiles
  }

  constexpr bool kForward = kRole == Role::Forward;
  if constexpr (T::kGroups == 1) {
#pragma unroll
    for (int i = 0; i < T::kTM; ++i)
#pragma unroll
      for (int j = 0; j < T::kTN; ++j)
        store_output(p, r0 + ty + i * D::kThreadsY, c0 + tx + j * D::kThreadsX, acc[i][j], kForward);
  } else {
    // The groups' partial tiles, summed in group order: the staging area is free (every group
    // passed the loop's last barrier, or ran no round at all).
    acc_t* partial = smem;
#pragma unroll
    for (int i = 0; i < T::kTM; ++i)
#pragma unroll
      for (int j = 0; j < T::kTN; ++j)
        partial[group * T::kBM * T::kBN + (ty + i * D::kThreadsY) * T::kBN + tx + j * D::kThreadsX] = acc[i][j];
    __syncthreads();
    acc_t v = partial[tid];
#pragma unroll
    for (int g = 1; g < T::kGroups; ++g) v += partial[g * T::kBM * T::kBN + tid];
    store_output(p, r0 + tid / T::kBN, c0 + tid % T::kBN, v, kForward);
  }
}

// ---- column sums ------------------------------------------------------------------------------

// Sums of columns col0 .. col0 + 31 of g (rows [row_begin, row_end) of a, masked by y when y is
// not null; row stride `cols`) in a fixed order: warp w takes rows row_begin + w, + 8, .. in order,
// then the 8 partials are added in warp order. Optionally writes g itself to g_out (same layout).
// Returns, in the lanes of warp 0, the sum of column col0 + lane (other threads: unspecified).
// partial: kThreads values of shared memory. Called by all 256 threads.
template <typename scalar_t>
__device__ __forceinline__ at::acc_type<scalar_t, false> column_sums(
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ y, scalar_t* __restrict__ g_out, int64_t cols,
    int64_t row_begin, int64_t row_end, int64_t col0, at::acc_type<scalar_t, false>* partial) {
  using sum_t = at::acc_type<scalar_t, false>;
  using op_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t col = col0 + lane;
  sum_t sum = sum_t(0);
  if (col < cols) {
#pragma unroll 4
    for (int64_t l = row_begin + warp; l < row_end; l += kWarps) {
      const int64_t at = l * cols + col;
      // Widened exactly as the GEMM's tiles are, so both add the same values.
      op_t v = static_cast<op_t>(a[at]);
      if (y != nullptr) v = static_cast<op_t>(y[at]) <= op_t(0) ? op_t(0) : v;
      if (g_out != nullptr) g_out[at] = static_cast<scalar_t>(v);  // exact: v is a's value or 0
      sum += static_cast<sum_t>(v);
    }
  }
  partial[warp * 32 + lane] = sum;
  __syncthreads();
  sum_t total = partial[lane];
  if (warp == 0) {
#pragma unroll
    for (int w = 1; w < kWarps; ++w) total += partial[w * 32 + lane];
  }
  return total;
}

// ---- the kernel and its launcher ----------------------------------------------------------------
// In an anonymous namespace: linear_relu.cu and dynamic_net.cu each instantiate their own copy (a
// kernel template shared across translation units would have one host stub for two device copies).
namespace {

template <typename scalar_t, class T>
__global__ void __launch_bounds__(kThreads, 2) gemm_group_kernel(const GemmGroup<scalar_t> group) {
  using acc_t = at::opmath_type<scalar_t>;
  using sum_t = at::acc_type<scalar_t, false>;
  const int64_t block = blockIdx.x;
  // The block's problem, selected with constant indices (a run-time index into the parameter
  // array would copy it to local memory).
  Problem<scalar_t> p = group.p[0];
  int64_t first = 0;
#pragma unroll
  for (int q = 1; q < kMaxProblems; ++q) {
    if (q < group.count && block >= group.first[q]) p = group.p[q], first = group.first[q];
  }
  const int64_t local = block - first;
  acc_t* smem = dynamic_smem<acc_t>();
  switch (p.role) {
    case Role::Forward: gemm_tile<scalar_t, T, Role::Forward>(p, local, smem); break;
    case Role::GradInput: gemm_tile<scalar_t, T, Role::GradInput>(p, local, smem); break;
    case Role::GradWeight: gemm_tile<scalar_t, T, Role::GradWeight>(p, local, smem); break;
    case Role::ColSum: {
      const int64_t col0 = local * kColSumCols;
      const sum_t total = column_sums(p.a, p.relu ? p.y : nullptr, static_cast<scalar_t*>(nullptr), p.cols, 0, p.red,
                                      col0, reinterpret_cast<sum_t*>(smem));
      if (threadIdx.x < 32 && col0 + threadIdx.x < p.cols) p.c[col0 + threadIdx.x] = static_cast<scalar_t>(total);
      break;
    }
  }
}


template <typename scalar_t, class T>
size_t gemm_smem_bytes() {
  using acc_t = at::opmath_type<scalar_t>;
  using D = TileDims<T>;
  const size_t staging = sizeof(acc_t) * T::kGroups * D::kStage;
  const size_t partials = T::kGroups > 1 ? sizeof(acc_t) * T::kGroups * T::kBM * T::kBN : 0;
  const size_t sums = sizeof(at::acc_type<scalar_t, false>) * kThreads;
  return std::max({staging, partials, sums});
}

// 4-element vector loads of a matrix whose rows have row_len elements: the rows must keep the
// alignment of the base, and the base must be aligned for the load width (16 bytes for float32
// and float64, 8 for half types).
template <typename scalar_t>
bool quad_loads_ok(const scalar_t* base, int64_t row_len) {
  const uintptr_t align = sizeof(scalar_t) >= 4 ? 16 : 8;
  return base != nullptr && row_len % 4 == 0 && reinterpret_cast<uintptr_t>(base) % align == 0;
}

// Collects the problems of one launch, then launches them.
template <typename scalar_t>
class GemmGroupBuilder {
 public:
  // C (rows x cols) = sum over red of A(i, l) B(l, j) for `role` (table at the top), with the
  // role's epilogue; relu: the Forward ReLU, or the mask of a by y. Skipped when C is empty.
  void gemm(Role role, const scalar_t* a, const scalar_t* y, const scalar_t* b, const scalar_t* bias, scalar_t* c,
            int64_t rows, int64_t cols, int64_t red, bool relu) {
    if (rows == 0 || cols == 0) return;
    Problem<scalar_t> q{};
    q.role = role, q.a = a, q.y = relu ? y : nullptr, q.b = b, q.bias = bias, q.c = c;
    q.rows = rows, q.cols = cols, q.red = red, q.relu = relu;
    const int64_t a_row = a_reduction_contiguous(role) ? red : rows, b_row = b_reduction_contiguous(role) ? red : cols;
    q.vec_a = quad_loads_ok(a, a_row) && (q.y == nullptr || quad_loads_ok(q.y, a_row));
    q.vec_b = quad_loads_ok(b, b_row);
    add(q);
    wide_tiles_ += ceil_div<int64_t>(rows, WideTile::kBM) * ceil_div<int64_t>(cols, WideTile::kBN);
  }

  // out[j] = sum over the red rows of g[l][j] (g = a, masked by y where relu), j < cols.
  void colsum(const scalar_t* a, const scalar_t* y, scalar_t* out, int64_t red, int64_t cols, bool relu) {
    if (cols == 0) return;
    Problem<scalar_t> q{};
    q.role = Role::ColSum, q.a = a, q.y = relu ? y : nullptr, q.c = out;
    q.rows = 1, q.cols = cols, q.red = red, q.relu = relu;
    add(q);
  }

  bool empty() const { return group_.count == 0; }

  void run() {
    if (empty()) return;
    paths::use_wide_tiles(wide_tiles_) ? launch_with<WideTile>() : launch_with<SplitTile>();
  }

 private:
  void add(const Problem<scalar_t>& q) {
    TORCH_CHECK(group_.count < kMaxProblems, "dynnet internal error: more than ", kMaxProblems, " GEMM problems");
    group_.p[group_.count++] = q;
  }

  template <class T>
  void launch_with() {
    group_.first[0] = 0;
    for (int q = 0; q < group_.count; ++q) {
      Problem<scalar_t>& p = group_.p[q];
      int64_t blocks;
      if (p.role == Role::ColSum) {
        blocks = ceil_div<int64_t>(p.cols, kColSumCols);
      } else {
        p.row_tiles = ceil_div<int64_t>(p.rows, T::kBM);
        blocks = p.row_tiles * ceil_div<int64_t>(p.cols, T::kBN);
      }
      group_.first[q + 1] = group_.first[q] + blocks;
    }
    for (int q = group_.count + 1; q <= kMaxProblems; ++q) group_.first[q] = group_.first[group_.count];
    const size_t smem = gemm_smem_bytes<scalar_t, T>();
    allow_dynamic_smem<gemm_group_kernel<scalar_t, T>>(smem);
    launch<gemm_group_kernel<scalar_t, T>>(grid_1d(group_.first[group_.count], "the CUDA GEMM"), kThreads, smem, group_);
  }

  GemmGroup<scalar_t> group_{};
  int64_t wide_tiles_ = 0;
};

}  // namespace
}  // namespace dynnet
