// CUDA kernels of dynnet::linear_relu and dynnet::linear_relu_backward (same semantics, outputs
// and errors as csrc/cpu/linear_relu.cpp).
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

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../common.h"

namespace dynnet {
namespace {

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
// __launch_bounds__(256, 2) lets ptxas use up to 128 registers a thread (2 blocks per SM): with
// the bound on threads alone it settled at 64 in some variants and spilled; with it none spill.
template <typename scalar_t, Role kRole, bool kRelu, bool kBias>
__global__ void __launch_bounds__(kThreads, 2) gemm_kernel(const GemmArgs<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using bias_acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  constexpr bool kARed = a_reduction_contiguous(kRole);
  constexpr bool kBRed = b_reduction_contiguous(kRole);
  constexpr bool kMaskA = kRelu && kRole != Role::Forward;

  __shared__ acc_t As[kBK][kBM + kPad];
  __shared__ acc_t Bs[kBK][kBN + kPad];

  const int tid = threadIdx.x;
  const int tx = tid % kThreadsX, ty = tid / kThreadsX;
  const int64_t tile_r = blockIdx.x % p.row_tiles, tile_c = blockIdx.x / p.row_tiles;
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
  TORCH_CHECK(blocks > 0 && blocks <= std::numeric_limits<int32_t>::max(),
              "dynnet: CUDA GEMM of ", args.rows, " x ", args.cols, " outputs needs ", blocks,
              " blocks, more than a CUDA grid holds");
  gemm_kernel<scalar_t, kRole, kRelu, kBias>
      <<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

at::Tensor linear_relu_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            c10::string_view activation) {
  check_linear_args(x, weight, bias);
  const Activation act = parse_activation(activation);
  TORCH_CHECK(x.is_cuda(), "dynnet: linear_relu's CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = leading_rows(x);
  // Allocated in its final shape: the op returns a tensor that is nobody's view (autograd
  // forbids in-place changes to views made inside a custom Function).
  at::Tensor y = at::empty(linear_out_shape(x, weight), x.options().memory_format(at::MemoryFormat::Contiguous));
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
  TORCH_CHECK(x.is_cuda(), "dynnet: linear_relu_backward's CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = leading_rows(x);
  const auto [need_gx, need_gw, need_gb] = output_mask;
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = need_gx ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous)) : empty();
  at::Tensor gw = need_gw ? at::empty({N, K}, x.options()) : empty();
  at::Tensor gb = need_gb ? at::empty({N}, x.options()) : empty();

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
        const int64_t blocks = ceil_div<int64_t>(N, kSumThreads);
        TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dynnet: out_features ", N, " too large");
        auto stream = at::cuda::getCurrentCUDAStream();
        scalar_t* gbp = gb.data_ptr<scalar_t>();
        if (relu) {
          bias_grad_kernel<scalar_t, true><<<static_cast<unsigned>(blocks), kSumThreads, 0, stream>>>(gyp, yp, gbp, M, N);
        } else {
          bias_grad_kernel<scalar_t, false><<<static_cast<unsigned>(blocks), kSumThreads, 0, stream>>>(gyp, yp, gbp, M, N);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  // Every output not launched for has no elements; a zero-length reduction (M, N or K == 0 on the
  // summed side) still launches and writes zeros.
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynnet, CUDA, m) {
  m.impl("linear_relu", &linear_relu_cuda);
  m.impl("linear_relu_backward", &linear_relu_backward_cuda);
}

}  // namespace dynnet
