// The GEMM micro-kernels, B packing and the tile loop, written once over a vector ISA `I`
// (gemm_avx512.cpp, gemm_avx2.cpp instantiate them; see gemm.cpp for the engine's design).
//
// Included only by the ISA units, inside an anonymous namespace, after their
// `#pragma GCC target`: every function here gets that unit's instruction set and internal
// linkage, so two units' instantiations can never be merged by the linker.
//
//   C[i, j] = epilogue(sum_k A[i, k] B[k, j]),   fp32 accumulation, A read through strides or
//   packed, B packed (PackedB). A micro-tile is R <= MR rows by NV <= NVMAX vectors of W floats;
//   its accumulators stay in registers for a whole K-block, B streams from the packed panel,
//   A is broadcast one element at a time (the "broadcast A, vector B" form that fits a row-major
//   C with bias along the row: the bias is one vector per column block).
//
// Loop nest of a task (rows [r0, r1) x panels [p0, p1)), float32:
//   for each chunk of panels that fits L2  (B-block kc x chunk stays in L2 across row tiles)
//     for each K-block q of kc rows
//       for each block of MC rows          (A packed here when it must be converted or masked)
//         for each row tile of MR rows     (A's MR x kc sliver stays in L1 across panels)
//           for each panel in the chunk    -> micro-kernel
// float32 K-blocks after the first add into C (fp32), so each C element's sum runs over k in
// the same order with the same grouping whatever the tile or task: bitwise identical results
// for any split of the work and any thread count.
// Half types (float16, bfloat16): all of K in one block, so C is rounded once from registers:
//   for each block of rows whose packed A fits a quarter of L2   (A packed once, here)
//     for each chunk of panels that fits L2  (one panel when K is long)
//       for each row tile of MR rows
//         for each panel in the chunk      -> micro-kernel
// Each element is again one sum over all of k in one order, whatever the split.

// Vector traits for one ISA: V holds W floats. Partial vectors (n < W valid lanes) only occur
// at the right edge of C (the last panel) and are loaded/stored with masks.

inline float to_f32(float v) { return v; }
inline float to_f32(bf16_t v) {
  const uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float to_f32(f16_t v) { return _cvtsh_ss(v.x); }

// ------------------------------------------------------------------------------------------
// Packing

// dst[k * width + j] = B(k0 + k, j0 + j) for k < kcb, j < w; zero for w <= j < width.
template <class I, typename T>
void pack_b_block(const Problem& p, int64_t k0, int64_t kcb, int64_t j0, int64_t w, int64_t width,
                  float* __restrict__ dst) {
  const T* src = static_cast<const T*>(p.b.p);
  const int64_t rs = p.b.rs, cs = p.b.cs;
  if (cs == 1) {  // rows of B contiguous: vector copies (and conversions)
    for (int64_t k = 0; k < kcb; ++k) {
      const T* row = src + (k0 + k) * rs + j0;
      float* out = dst + k * width;
      for (int64_t j = 0; j < width; j += I::W) {
        const int64_t n = std::min<int64_t>(I::W, w - j);
        I::store(out + j, n > 0 ? I::load(row + j, static_cast<int>(n)) : I::zero());
      }
    }
    return;
  }
  // Columns of B contiguous (B = W^T in the forward): transpose W x W register blocks, the
  // edge blocks with masked loads (zero columns past N, zero-padded) and fewer stored rows.
  if constexpr (std::is_same_v<T, float>) {
    if (rs == 1) {
      for (int64_t j = 0; j < width; j += I::W)
        for (int64_t k = 0; k < kcb; k += I::W)
          I::transpose_block(src + (j0 + j) * cs + (k0 + k), cs, dst + k * width + j, width,
                             static_cast<int>(std::clamp<int64_t>(w - j, 0, I::W)),
                             static_cast<int>(std::min<int64_t>(I::W, kcb - k)));
      return;
    }
  }
  for (int64_t k = 0; k < kcb; ++k) {
    float* out = dst + k * width;
    for (int64_t jj = 0; jj < w; ++jj) out[jj] = to_f32(src[(k0 + k) * rs + (j0 + jj) * cs]);
    for (int64_t jj = w; jj < width; ++jj) out[jj] = 0.f;
  }
}

// Widths of the panels: NR for all but possibly the last, which is rounded up to whole vectors.
template <class I>
int64_t panel_width(int64_t N, int64_t panel) {
  const int64_t w = std::min<int64_t>(I::NR, N - panel * I::NR);
  return (w + I::W - 1) / I::W * I::W;
}
template <class I>
int64_t padded_n(int64_t N) {
  const int64_t P = (N + I::NR - 1) / I::NR;
  return P == 0 ? 0 : (P - 1) * I::NR + panel_width<I>(N, P - 1);
}

template <class I>
int64_t kc_for(DType dtype, int64_t K) {
  // Half types keep all of K in registers so the output is rounded once; float32 blocks K so
  // the B-block and A-sliver stay in cache (partial sums go through C in fp32, exactly).
  return dtype == DType::F32 ? I::KC : std::max<int64_t>(K, 1);
}

template <class I>
size_t packed_b_bytes(DType dtype, int64_t K, int64_t N) {
  const int64_t words = std::max<int64_t>((K + I::KPACK - 1) / I::KPACK, 1);
  return static_cast<size_t>(words * padded_n<I>(N)) * sizeof(typename I::Word);
}

// bfloat16 pairs for vdpbf16ps (KPACK == 2): word (kk, j) holds B(2 kk, j) in its low half and
// B(2 kk + 1, j) in its high half; zero past K and N. All of K in one block (half types). B's
// rows contiguous (the backward's W and x): two rows interleaved a vector at a time. B = W^T
// with W's rows contiguous (the forward) and K even: word (kk, j) is W's 32-bit word (j, kk), so
// the panel is W's words transposed, W x W at a time. Other strides: element by element.
template <class I>
void pack_b_pairs(const Problem& p, uint32_t* dst, int64_t p0, int64_t p1) {
  const uint16_t* src = static_cast<const uint16_t*>(p.b.p);
  const int64_t K = p.K, N = p.N, rs = p.b.rs, cs = p.b.cs, kk_n = (K + 1) / 2;
  for (int64_t q = p0; q < p1; ++q) {
    const int64_t j0 = q * I::NR, w = std::min<int64_t>(I::NR, N - j0), width = panel_width<I>(N, q);
    uint32_t* panel = dst + kk_n * j0;
    if (cs == 1) {
      for (int64_t kk = 0; kk < kk_n; ++kk) {
        const bf16_t* lo = reinterpret_cast<const bf16_t*>(src + 2 * kk * rs + j0);
        const bf16_t* hi = 2 * kk + 1 < K ? lo + rs : nullptr;
        for (int64_t j = 0; j < width; j += I::W) {
          const int n = static_cast<int>(std::clamp<int64_t>(w - j, 0, I::W));
          const typename I::V v = n == 0 ? I::zero() : I::pair(I::load(lo + j, n), hi ? I::load(hi + j, n) : I::zero());
          I::storew(panel + kk * width + j, v, I::W);
        }
      }
      continue;
    }
    if (rs == 1 && K % 2 == 0 && cs % 2 == 0) {
      const float* words = reinterpret_cast<const float*>(src);  // W's 32-bit words, moved as they are
      for (int64_t j = 0; j < width; j += I::W)
        for (int64_t kk = 0; kk < kk_n; kk += I::W)
          I::transpose_block(words + (j0 + j) * (cs / 2) + kk, cs / 2, reinterpret_cast<float*>(panel + kk * width + j),
                             width, static_cast<int>(std::clamp<int64_t>(w - j, 0, I::W)),
                             static_cast<int>(std::min<int64_t>(I::W, kk_n - kk)));
      continue;
    }
    for (int64_t kk = 0; kk < kk_n; ++kk) {
      const uint16_t* lo = src + 2 * kk * rs + j0 * cs;
      const uint16_t* hi = 2 * kk + 1 < K ? lo + rs : nullptr;
      uint32_t* out = panel + kk * width;
      for (int64_t j = 0; j < w; ++j) out[j] = uint32_t(lo[j * cs]) | (hi ? uint32_t(hi[j * cs]) << 16 : 0u);
      for (int64_t j = w; j < width; ++j) out[j] = 0;
    }
  }
}

template <class I, typename T>
void pack_b_panels(const Problem& p, void* dst_, int64_t p0, int64_t p1) {
  if constexpr (I::KPACK == 2) {
    return pack_b_pairs<I>(p, static_cast<uint32_t*>(dst_), p0, p1);
  } else {
  float* dst = static_cast<float*>(dst_);
  const int64_t K = p.K, N = p.N, kc = kc_for<I>(p.dtype, K), Np = padded_n<I>(N);
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t kcb = std::min(kc, K - k0);
    float* block = dst + k0 * Np;
    for (int64_t q = p0; q < p1; ++q) {
      const int64_t j0 = q * I::NR;
      pack_b_block<I, T>(p, k0, kcb, j0, std::min<int64_t>(I::NR, N - j0), panel_width<I>(N, q),
                         block + kcb * j0);
    }
  }
  }
}

// A's rows [i0, i0 + R) x columns [k0, k0 + kcb), converted to fp32 and masked (ReLU's
// backward: where y <= 0 the gradient is 0; NaN in y keeps it) when the problem says so, into a
// sliver the micro-kernel reads through strides; returns them (rs, cs). The layout follows the
// source so that both sides stay contiguous and the copy runs on vectors: a row-major A (grad_y
// in grad_x = g @ W) gives rows of kcb, a column-major A (grad_y.T in grad_W = g.T @ x) gives
// MR-wide columns.
template <class I, typename T>
std::pair<int64_t, int64_t> pack_a_sliver(const Problem& p, int64_t i0, int R, int64_t k0, int64_t kcb, void* dst_) {
  const T* a = static_cast<const T*>(p.a.p);
  const T* m = static_cast<const T*>(p.a_mask_y.p);
  const View& av = p.a;
  const View& mv = p.a_mask_y;
  float* dst = static_cast<float*>(dst_);
  {
    if (av.cs == 1 && (!m || mv.cs == 1)) {  // rows along k
      for (int i = 0; i < R; ++i) {
        const T* ar = a + (i0 + i) * av.rs + k0;
        const T* mr = m ? m + (i0 + i) * mv.rs + k0 : nullptr;
        for (int64_t k = 0; k < kcb; k += I::W) {
          const int n = static_cast<int>(std::min<int64_t>(I::W, kcb - k));
          typename I::V v = I::load(ar + k, n);
          if (m) v = I::mask_le0(I::load(mr + k, n), v);
          I::store(dst + i * kcb + k, v, n);
        }
      }
      return {kcb, 1};
    }
    if (av.rs == 1 && (!m || mv.rs == 1)) {  // columns along i, R <= MR <= W of them
      for (int64_t k = 0; k < kcb; ++k) {
        typename I::V v = I::load(a + i0 + (k0 + k) * av.cs, R);
        if (m) v = I::mask_le0(I::load(m + i0 + (k0 + k) * mv.cs, R), v);
        I::store(dst + k * I::MR, v, R);
      }
      return {1, I::MR};
    }
    for (int i = 0; i < R; ++i) {  // any other strides, element by element
      const T* ar = a + (i0 + i) * av.rs + k0 * av.cs;
      const T* mr = m ? m + (i0 + i) * mv.rs + k0 * mv.cs : nullptr;
      for (int64_t k = 0; k < kcb; ++k) {
        const float v = to_f32(ar[k * av.cs]);
        dst[k * I::MR + i] = (m && to_f32(mr[k * mv.cs]) <= 0.f) ? 0.f : v;
      }
    }
    return {1, I::MR};
  }
}

// Where pack_a_block put a block of A: the tile whose first row is the block's row r starts at
// dst + r * row, and A(i, k) of the tile is at [i * rs + k * cs] from there (in words).
struct ABlock {
  int64_t rs, cs, row;
};

// bfloat16 k-pairs (KPACK 2) of A's rows [ib, ie) x columns [k0, k0 + kcb), masked when the
// problem says so: word (i, kk) = A(i, k0 + 2 kk) | A(i, k0 + 2 kk + 1) << 16, zero past kcb.
// A row-major A (the forward's x, grad_x's grad_y) holds these words already: rows of them are
// copied (masked) a vector at a time. A column-major A (grad_W's grad_y^T) pairs two of its
// columns a vector of the block's rows at a time, into kcw columns of the block's height (the
// tiles' slivers side by side). Other strides: element by element, into rows.
// ReLU's backward mask on the words v from the words y of the same k-pairs, each half on its own.
template <class I>
typename I::V mask_pairs(typename I::V y, typename I::V v) {
  return I::pair(I::mask_le0(I::lo(y), I::lo(v)), I::mask_le0(I::hi(y), I::hi(v)));
}

template <class I>
ABlock pack_a_pairs(const Problem& p, int64_t ib, int64_t ie, int64_t k0, int64_t kcb, uint32_t* dst) {
  using V = typename I::V;
  const bf16_t* a = static_cast<const bf16_t*>(p.a.p);
  const bf16_t* m = static_cast<const bf16_t*>(p.a_mask_y.p);
  const View& av = p.a;
  const View& mv = p.a_mask_y;
  const int64_t kcw = (kcb + 1) / 2, h = ie - ib;
  if (av.cs == 1 && (!m || mv.cs == 1)) {
    for (int64_t i = ib; i < ie; ++i) {
      const bf16_t* ar = a + i * av.rs + k0;
      const bf16_t* mr = m ? m + i * mv.rs + k0 : nullptr;
      for (int64_t k = 0; k < kcb; k += 2 * I::W) {
        const int n = static_cast<int>(std::min<int64_t>(2 * I::W, kcb - k));  // elements: n / 2 words, rounded up
        V v = I::load_pairs(ar + k, n);
        if (m) v = mask_pairs<I>(I::load_pairs(mr + k, n), v);
        I::storew(dst + (i - ib) * kcw + k / 2, v, (n + 1) / 2);
      }
    }
    return {kcw, 1, kcw};
  }
  if (av.rs == 1 && (!m || mv.rs == 1)) {
    for (int64_t kk = 0; kk < kcw; ++kk) {
      const bool has_hi = 2 * kk + 1 < kcb;
      const bf16_t* lo = a + (k0 + 2 * kk) * av.cs;
      const bf16_t* ml = m ? m + (k0 + 2 * kk) * mv.cs : nullptr;
      for (int64_t i = ib; i < ie; i += I::W) {
        const int n = static_cast<int>(std::min<int64_t>(I::W, ie - i));
        V l = I::load(lo + i, n), u = has_hi ? I::load(lo + av.cs + i, n) : I::zero();
        if (m) {
          l = I::mask_le0(I::load(ml + i, n), l);
          if (has_hi) u = I::mask_le0(I::load(ml + mv.cs + i, n), u);
        }
        I::storew(dst + kk * h + (i - ib), I::pair(l, u), n);
      }
    }
    return {1, h, 1};
  }
  for (int64_t i = ib; i < ie; ++i) {  // any other strides, element by element
    const bf16_t* ar = a + i * av.rs + k0 * av.cs;
    const bf16_t* mr = m ? m + i * mv.rs + k0 * mv.cs : nullptr;
    const auto bits = [&](int64_t k) -> uint32_t {
      return k >= kcb || (m && to_f32(mr[k * mv.cs]) <= 0.f) ? 0u : ar[k * av.cs].x;
    };
    for (int64_t kk = 0; kk < kcw; ++kk) dst[(i - ib) * kcw + kk] = bits(2 * kk) | bits(2 * kk + 1) << 16;
  }
  return {kcw, 1, kcw};
}

// A's rows [ib, ie) x columns [k0, k0 + kcb), converted (fp32, or bfloat16 k-pairs) and masked,
// for the micro-kernel; returns where it put them. fp32: a sliver per row tile (pack_a_sliver),
// tile t's at dst + t * MR * kcw words; a column-major A is read k by k across the whole block
// (one contiguous run of source per k instead of a few elements of each of kcb cache lines per
// tile, which thrash L1 when the source's row stride is a large power of 2).
template <class I, typename T>
ABlock pack_a_block(const Problem& p, int64_t ib, int64_t ie, int64_t k0, int64_t kcb, typename I::Word* dst) {
  if constexpr (I::KPACK == 2) {
    return pack_a_pairs<I>(p, ib, ie, k0, kcb, dst);
  } else {
    const T* m = static_cast<const T*>(p.a_mask_y.p);
    if (p.a.rs == 1 && p.a.cs != 1 && (!m || p.a_mask_y.rs == 1)) {
      const T* a = static_cast<const T*>(p.a.p);
      for (int64_t k = 0; k < kcb; ++k) {
        const T* ak = a + (k0 + k) * p.a.cs;
        const T* mk = m ? m + (k0 + k) * p.a_mask_y.cs : nullptr;
        for (int64_t i = ib; i < ie; i += I::MR) {
          const int R = static_cast<int>(std::min<int64_t>(I::MR, ie - i));
          typename I::V v = I::load(ak + i, R);
          if (m) v = I::mask_le0(I::load(mk + i, R), v);
          I::store(dst + (i - ib) * kcb + k * I::MR, v, R);
        }
      }
      return {1, I::MR, kcb};
    }
    std::pair<int64_t, int64_t> strides{1, I::MR};
    for (int64_t i = ib; i < ie; i += I::MR)
      strides = pack_a_sliver<I, T>(p, i, static_cast<int>(std::min<int64_t>(I::MR, ie - i)), k0, kcb, dst + (i - ib) * kcb);
    return {strides.first, strides.second, kcb};
  }
}

// ------------------------------------------------------------------------------------------
// The smooth activations (the epilogue's last step, and the backward's g pass).

#include "activation_kernel.h"

// C(i, j) = act(src(i, j)) for rows [0, R) and columns [0, w) of a block whose GEMM store has just
// been written (src: z, or C itself, row strides lds and ldc): still in L1, so the activation
// costs no pass over memory. Called once per row tile and chunk of panels (both forms), not per
// micro-tile, so the call is spread over up to a few hundred elements a row.
template <class I, typename T>
[[gnu::noinline]] void activate_block(Act act, const void* src, int64_t lds, void* c, int64_t ldc, int64_t R,
                                      int64_t w) {
  for (int64_t i = 0; i < R; ++i)
    activation_typed<I, T>(act, static_cast<const T*>(src) + i * lds, static_cast<T*>(c) + i * ldc, w);
}

// ------------------------------------------------------------------------------------------
// The micro-kernel: R rows x NV vectors of C, kcb steps of k.

struct TileArgs {
  int64_t kcb;
  const void* a;  // A(i, k) at a[i * rs_a + k * cs_a] (in words: k pairs for KPACK 2)
  int64_t rs_a, cs_a;
  const void* b;  // B's panel (packed or where it lies), row k at b[k * ldb]
  int64_t ldb;
  int btail;       // valid lanes of the panel's last B vector: W when packed (zero-padded)
  void* c;         // C(i, j) at c[i * ldc + j], already offset to the tile
  int64_t ldc;
  int nlast;                 // valid lanes of the last vector (1..W)
  const void* bias;          // offset to the tile's first column, or nullptr
  const void* mask_y;        // offset to the tile, row stride ldm, or nullptr
  int64_t ldm;
  bool relu, first, last;
};

template <class I, typename T, int R, int NV>
void micro_kernel(const TileArgs& t) {
  using V = typename I::V;
  V acc[R][NV];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = I::zero();

  using Word = typename I::Word;
  const int64_t rs = t.rs_a, cs = t.cs_a, ldb = t.ldb, steps = (t.kcb + I::KPACK - 1) / I::KPACK;
  // tail: B read where it lies at the right edge of C, its last vector loaded with a mask.
  const auto products = [&](auto tail) __attribute__((always_inline)) {  // acc stays in registers
    const Word* __restrict__ b = static_cast<const Word*>(t.b);
    const Word* a = static_cast<const Word*>(t.a);
    for (int64_t k = 0; k < steps; ++k) {
      V bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        if constexpr (decltype(tail)::value) bv[v] = v == NV - 1 ? I::load(b + v * I::W, t.btail) : I::loadw(b + v * I::W);
        else bv[v] = I::loadw(b + v * I::W);
      }
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) {
        const V av = I::bcast(a + i * rs);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] = I::dot(av, bv[v], acc[i][v]);
      }
      b += ldb;
      a += cs;
    }
  };
  if constexpr (std::is_same_v<Word, float>) {
    if (t.btail < I::W) products(std::true_type{});
    else products(std::false_type{});
  } else {
    products(std::false_type{});
  }

  // The store: partial sums of earlier K-blocks (float32 only), then bias, ReLU, mask, rounding.
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const int n = v == NV - 1 ? t.nlast : I::W;
      V r = acc[i][v];
      if constexpr (std::is_same_v<T, float>) {
        if (!t.first) r = I::add(r, I::load(static_cast<const float*>(t.c) + i * t.ldc + v * I::W, n));
      }
      if (t.last) {
        if (t.bias) r = I::add(r, I::load(static_cast<const T*>(t.bias) + v * I::W, n));
        if (t.relu) r = I::relu(r);
        if (t.mask_y) r = I::mask_le0(I::load(static_cast<const T*>(t.mask_y) + i * t.ldm + v * I::W, n), r);
        I::store(static_cast<T*>(t.c) + i * t.ldc + v * I::W, r, n);
      } else {
        I::store(static_cast<float*>(t.c) + i * t.ldc + v * I::W, r, n);
      }
    }
  }
}

// kernels[R - 1][NV - 1]
template <class I, typename T>
struct KernelTable {
  using Fn = void (*)(const TileArgs&);
  Fn fn[I::MR][I::NVMAX];

  template <int R, int NV>
  void fill_one() {
    fn[R - 1][NV - 1] = &micro_kernel<I, T, R, NV>;
    if constexpr (NV < I::NVMAX) fill_one<R, NV + 1>();
    else if constexpr (R < I::MR) fill_one<R + 1, 1>();
  }
  KernelTable() { fill_one<1, 1>(); }
};

// ------------------------------------------------------------------------------------------
// The tile loop of one task: rows [r0, r1) x panels [p0, p1) of C.

template <class I, typename T>
void compute_rect(const Problem& p, const PackedB& pb, int64_t r0, int64_t r1, int64_t p0, int64_t p1,
                  float* a_buf) {
  static const KernelTable<I, T> table;
  using Word = typename I::Word;
  constexpr bool half = !std::is_same_v<T, float>;
  const int64_t K = p.K, N = p.N, kc = pb.kc, Np = padded_n<I>(N);
  const Word* bdata = static_cast<const Word*>(pb.data);
  Word* abuf = reinterpret_cast<Word*>(a_buf);
  const bool direct = pb.form == Form::Direct;  // float32 B where it lies, rows p.b.rs apart
  // A is read where it lies when it is float32, unmasked and has a unit stride along k or
  // along i; otherwise it is packed (converted, masked) a block of rows at a time.
  const bool pack_a = half || p.a_mask_y.p != nullptr || (p.a.cs != 1 && p.a.rs != 1);
  static_assert(I::KPACK == 1 || half, "k pairs are for bfloat16 only");
  static_assert(I::MR <= I::W, "a column of an A sliver is one vector");
  const T* bias = static_cast<const T*>(p.epi.bias);
  const T* mask = static_cast<const T*>(p.epi.mask_y.p);
  const int64_t nblocks = K == 0 ? 1 : (K + kc - 1) / kc;
  // When the activation's input is kept, the GEMM runs into z (its partial sums too) and the
  // activation reads each stored block from there into C (activate_block).
  T* const out = static_cast<T*>(p.c);
  T* const cm = p.epi.z.p ? static_cast<T*>(const_cast<void*>(p.epi.z.p)) : out;
  const int64_t ldc = p.epi.z.p ? p.epi.z.rs : p.ldc;

  TileArgs t;
  t.ldc = ldc;
  t.ldm = p.epi.mask_y.rs;
  t.relu = p.epi.relu;
  // The row tile [i, i + R) of K-block q across panels [c0, c1): A's sliver at `a` with strides
  // `ab`, the K-block's B at `block`.
  const auto row_tile = [&](int64_t i, int R, int64_t q, const Word* block, const void* a, const ABlock& ab,
                            int64_t c0, int64_t c1) {
    const int64_t kcb = std::min(kc, K - q * kc), kcw = (kcb + I::KPACK - 1) / I::KPACK;
    t.kcb = kcb;
    t.a = a;
    t.rs_a = ab.rs;
    t.cs_a = ab.cs;
    t.first = q == 0;
    t.last = q == nblocks - 1;
    for (int64_t jp = c0; jp < c1; ++jp) {
      const int64_t j0 = jp * I::NR;
      const int64_t w = std::min<int64_t>(I::NR, N - j0);
      const int NV = static_cast<int>((w + I::W - 1) / I::W);
      t.c = cm + i * ldc + j0;
      t.nlast = static_cast<int>(w - (NV - 1) * I::W);
      t.b = direct ? block + j0 : block + kcw * j0;
      t.ldb = direct ? p.b.rs : NV * I::W;
      t.btail = direct ? t.nlast : I::W;
      t.bias = bias ? bias + j0 : nullptr;
      t.mask_y = mask ? mask + i * p.epi.mask_y.rs + j0 : nullptr;
      table.fn[R - 1][NV - 1](t);
    }
    if (t.last && p.epi.smooth) {
      const int64_t j0 = c0 * I::NR, j1 = std::min(N, c1 * I::NR);
      activate_block<I, T>(p.epi.act, cm + i * ldc + j0, ldc, out + i * p.ldc + j0, p.ldc, R, j1 - j0);
    }
  };

  // Panels per chunk: the chunk's B-block (kc rows, in words) fits half of L2; each row tile's
  // A sliver stays in L1 across the chunk's panels.
  const int64_t kcw = (std::max<int64_t>(kc, 1) + I::KPACK - 1) / I::KPACK;
  const int64_t chunk = std::max<int64_t>(1, I::L2_FLOATS / 2 / (kcw * I::NR));
  if constexpr (half) {
    // Half types: one K-block (the output is rounded once, from registers), so A is packed once
    // per block of rows - rows blocked so that the packed block takes at most a quarter of L2 -
    // and every chunk of panels runs over it.
    const int64_t mc = std::max<int64_t>(I::MR, std::min<int64_t>(I::MC, I::L2_FLOATS / 4 / kcw) / I::MR * I::MR);
    for (int64_t ib = r0; ib < r1; ib += mc) {
      const int64_t ie = std::min(r1, ib + mc);
      const ABlock ab = pack_a_block<I, T>(p, ib, ie, 0, K, abuf);
      for (int64_t c0 = p0; c0 < p1; c0 += chunk)
        for (int64_t i = ib; i < ie; i += I::MR)
          row_tile(i, static_cast<int>(std::min<int64_t>(I::MR, ie - i)), 0, bdata, abuf + (i - ib) * ab.row, ab, c0,
                   std::min(p1, c0 + chunk));
    }
    return;
  }
  for (int64_t c0 = p0; c0 < p1; c0 += chunk) {
    const int64_t c1 = std::min(p1, c0 + chunk);
    for (int64_t q = 0; q < nblocks; ++q) {
      const int64_t k0 = q * kc, kcb = std::min(kc, K - k0);
      const Word* block = direct ? bdata + k0 * p.b.rs : bdata + k0 * Np;
      for (int64_t ib = r0; ib < r1; ib += I::MC) {
        const int64_t ie = std::min(r1, ib + I::MC);
        const ABlock ab = pack_a ? pack_a_block<I, T>(p, ib, ie, k0, kcb, abuf) : ABlock{p.a.rs, p.a.cs, 0};
        for (int64_t i = ib; i < ie; i += I::MR) {
          const void* a = pack_a ? static_cast<const void*>(abuf + (i - ib) * ab.row)
                                 : static_cast<const void*>(static_cast<const T*>(p.a.p) + i * p.a.rs + k0 * p.a.cs);
          row_tile(i, static_cast<int>(std::min<int64_t>(I::MR, ie - i)), q, block, a, ab, c0, c1);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// The dot form: C[i, j] = sum_k A[i, k] B[k, j] with A's rows and B's columns both contiguous
// along k - the forward's x @ W^T, B = W^T read as W's rows. Nothing is packed: a DR x DC tile
// keeps DR x DC vector accumulators, each a W-lane partial sum of one C element over k (lane l
// sums k = l, l + W, ...); per k-step DR vectors of A and DC of B are loaded where they lie.
// At the end of a K-block the W lanes of each accumulator are summed by a fixed tree (hsum),
// and the DC sums of a row - DC consecutive elements of C - get the epilogue and one masked
// store. So the packed form's costs go away: no pass over W to pack it (at M = 64 it costs as
// much as a quarter of the products), no zero-padded lanes at an N that is no multiple of 16
// (N = 100: 16 % waste), and no packed B shared between the cores.
//
// Loop nest of a task (rows [r0, r1) x columns [c0, c1)): chunks of columns whose B rows fit
// half of L2, then K-blocks of DKC, then row tiles (A's DR x DKC block stays in L1), then
// column tiles (B's DC x DKC block streams from L2). float32 K-blocks after the first add into
// C (as in the packed form): each element's sum has the same order and grouping whatever the
// tile or task, so any split of rows and columns gives the same bits.

// hsum<C>(acc)[j] = the sum of acc[j]'s lanes, j < C <= 8, by a fixed tree.
template <class I, int C>
__m256 hsum(const typename I::V* acc) {
  __m256 f[8];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) f[j] = j < C ? I::fold(acc[j]) : _mm256_setzero_ps();
  const __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(f[0], f[1]), _mm256_hadd_ps(f[2], f[3]));
  const __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(f[4], f[5]), _mm256_hadd_ps(f[6], f[7]));
  // q0 = [sums of lanes 0-3 of f0..f3 | of lanes 4-7 of f0..f3], q1 the same for f4..f7.
  return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
}

struct DotArgs {
  const float* a;  // A(i, k) at a[i * lda + k], offset to the tile and the K-block
  int64_t lda;
  const float* b;  // B(k, j) at b[j * ldb + k], offset likewise
  int64_t ldb;
  int64_t kcb;
  float* c;  // offset to the tile
  int64_t ldc;
  const float* bias;  // offset to the tile's first column, or nullptr
  bool relu, first, last;
};

template <class I, int R, int C>
void dot_kernel(const DotArgs& t) {
  using V = typename I::V;
  V acc[R][C];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < C; ++j) acc[i][j] = I::zero();
  const float* __restrict__ a = t.a;
  const float* __restrict__ b = t.b;
  const auto step = [&](int64_t k, int n) {  // n valid lanes: W but at the K-block's end
    V av[R];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) av[i] = n == I::W ? I::load(a + i * t.lda + k) : I::load(a + i * t.lda + k, n);
#pragma GCC unroll 8
    for (int j = 0; j < C; ++j) {
      const V bv = n == I::W ? I::load(b + j * t.ldb + k) : I::load(b + j * t.ldb + k, n);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) acc[i][j] = I::fma(av[i], bv, acc[i][j]);
    }
  };
  const int64_t full = t.kcb / I::W * I::W;
  for (int64_t k = 0; k < full; k += I::W) step(k, I::W);
  if (full < t.kcb) step(full, static_cast<int>(t.kcb - full));

#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    __m256 s = hsum<I, C>(acc[i]);
    float* c = t.c + i * t.ldc;
    if (!t.first) s = _mm256_add_ps(s, I::load8(c, C));
    if (t.last) {
      if (t.bias) s = _mm256_add_ps(s, I::load8(t.bias, C));
      if (t.relu) s = _mm256_max_ps(_mm256_setzero_ps(), s);  // max returns its 2nd operand for NaN: keeps NaN
    }
    I::store8(c, s, C);
  }
}

template <class I>
struct DotTable {  // fn[R - 1][C - 1]
  using Fn = void (*)(const DotArgs&);
  Fn fn[I::DR][I::DC];

  template <int R, int C>
  void fill_one() {
    fn[R - 1][C - 1] = &dot_kernel<I, R, C>;
    if constexpr (C < I::DC) fill_one<R, C + 1>();
    else if constexpr (R < I::DR) fill_one<R + 1, 1>();
  }
  DotTable() { fill_one<1, 1>(); }
};

template <class I>
void dot_rect(const Problem& p, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  static_assert(I::DC <= 8, "a row of a dot tile is one 8-float vector after hsum");
  static const DotTable<I> table;
  const int64_t K = p.K, kc = I::DKC;
  const float* A = static_cast<const float*>(p.a.p);
  const float* B = static_cast<const float*>(p.b.p);
  const float* bias = static_cast<const float*>(p.epi.bias);
  // With the activation's input kept, the GEMM runs into z and the activation reads it from there.
  float* const out = static_cast<float*>(p.c);
  float* const Cm = p.epi.z.p ? static_cast<float*>(const_cast<void*>(p.epi.z.p)) : out;
  const int64_t lda = p.a.rs, ldb = p.b.cs, ldc = p.epi.z.p ? p.epi.z.rs : p.ldc;
  // Columns per chunk: their B rows (kc floats each) fill half of L2.
  const int64_t chunk = std::max<int64_t>(I::DC, I::L2_FLOATS / 2 / kc / I::DC * I::DC);
  const int64_t nblocks = K == 0 ? 1 : (K + kc - 1) / kc;
  DotArgs t;
  t.lda = lda;
  t.ldb = ldb;
  t.ldc = ldc;
  t.relu = p.epi.relu;
  for (int64_t cc = c0; cc < c1; cc += chunk) {
    const int64_t ce = std::min(c1, cc + chunk);
    for (int64_t q = 0; q < nblocks; ++q) {
      const int64_t k0 = q * kc;
      t.kcb = std::min(kc, K - k0);
      t.first = q == 0;
      t.last = q == nblocks - 1;
      for (int64_t i = r0; i < r1; i += I::DR) {
        const int R = static_cast<int>(std::min<int64_t>(I::DR, r1 - i));
        t.a = A + i * lda + k0;
        for (int64_t j = cc; j < ce; j += I::DC) {
          const int C = static_cast<int>(std::min<int64_t>(I::DC, ce - j));
          t.b = B + j * ldb + k0;
          t.c = Cm + i * ldc + j;
          t.bias = bias ? bias + j : nullptr;
          table.fn[R - 1][C - 1](t);
        }
        if (t.last && p.epi.smooth)
          activate_block<I, float>(p.epi.act, Cm + i * ldc + cc, ldc, out + i * p.ldc + cc, p.ldc, R, ce - cc);
      }
    }
  }
}

template <class I>
void pack_b_any(const Problem& p, void* d, int64_t p0, int64_t p1) {
  switch (p.dtype) {
    case DType::F32: return pack_b_panels<I, float>(p, d, p0, p1);
    case DType::BF16: return pack_b_panels<I, bf16_t>(p, d, p0, p1);
    case DType::F16: return pack_b_panels<I, f16_t>(p, d, p0, p1);
  }
}

template <class I>
void compute_any(const Problem& p, const PackedB& b, int64_t r0, int64_t r1, int64_t p0, int64_t p1,
                 float* scratch) {
  switch (p.dtype) {
    case DType::F32: return compute_rect<I, float>(p, b, r0, r1, p0, p1, scratch);
    case DType::BF16: return compute_rect<I, bf16_t>(p, b, r0, r1, p0, p1, scratch);
    case DType::F16: return compute_rect<I, f16_t>(p, b, r0, r1, p0, p1, scratch);
  }
}

// out[j - c0] = the sum over rows i, in order, of g(i, j) - where y is given, masked by ReLU's
// backward (y(i, j) <= 0 gives 0; NaN in y lets g through) - for columns [c0, c1); g and y
// row-major (row strides ld, y_ld), fp32 sums rounded once to T: the half types' grad_bias
// (float32 keeps building_blocks.h's double sums). Columns are summed independently, so any split of
// the columns gives the same bits.
template <class I, typename T>
void column_sums(const void* g_, int64_t ld, const void* y_, int64_t y_ld, int64_t rows, int64_t c0, int64_t c1,
                 void* out_) {
  using V = typename I::V;
  constexpr int NV = 4;  // independent sums in flight
  const T* g = static_cast<const T*>(g_);
  const T* y = static_cast<const T*>(y_);
  T* out = static_cast<T*>(out_);
  for (int64_t j = c0; j < c1; j += NV * I::W) {
    V acc[NV];
    int n[NV];
    for (int v = 0; v < NV; ++v) {
      acc[v] = I::zero();
      n[v] = static_cast<int>(std::clamp<int64_t>(c1 - j - v * I::W, 0, I::W));
    }
    for (int64_t i = 0; i < rows; ++i)
      for (int v = 0; v < NV && n[v] > 0; ++v) {
        V x = I::load(g + i * ld + j + v * I::W, n[v]);
        if (y) x = I::mask_le0(I::load(y + i * y_ld + j + v * I::W, n[v]), x);
        acc[v] = I::add(acc[v], x);
      }
    for (int v = 0; v < NV && n[v] > 0; ++v) I::store(out + (j - c0) + v * I::W, acc[v], n[v]);
  }
}

template <class I>
void column_sums_any(DType dtype, const void* g, int64_t ld, const void* y, int64_t y_ld, int64_t rows, int64_t c0,
                     int64_t c1, void* out) {
  switch (dtype) {
    case DType::F32: return column_sums<I, float>(g, ld, y, y_ld, rows, c0, c1, out);
    case DType::BF16: return column_sums<I, bf16_t>(g, ld, y, y_ld, rows, c0, c1, out);
    case DType::F16: return column_sums<I, f16_t>(g, ld, y, y_ld, rows, c0, c1, out);
  }
}

// The table's own product instruction in a register-only loop: fp32 FMA, or vdpbf16ps on
// bfloat16 k-pairs (KPACK 2: two multiply-adds per lane).
template <class I>
double fma_loop(int64_t iters) {
  using V = typename I::V;
  using Word = typename I::Word;
  constexpr int n = 2 * I::MR * I::NVMAX > 24 ? 24 : 2 * I::MR * I::NVMAX;  // enough chains to cover the latency
  V acc[n];
  for (int i = 0; i < n; ++i) acc[i] = I::zero();
  Word one, tiny;  // 1 and 1e-7 (bfloat16 pairs: 0x3f80 and 0x33d6 in both halves)
  if constexpr (I::KPACK == 2) one = 0x3f803f80u, tiny = 0x33d633d6u;
  else one = 1.0f, tiny = 1e-7f;
  const V a = I::bcast(&one), b = I::bcast(&tiny);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 24
    for (int i = 0; i < n; ++i) acc[i] = I::dot(a, b, acc[i]);
  }
  V sum = acc[0];
  for (int i = 1; i < n; ++i) sum = I::add(sum, acc[i]);
  float out[I::W];
  I::store(out, sum);
  // The result feeds the return value, so the loop cannot be dropped; it is ~0 by construction.
  return 2.0 * I::KPACK * I::W * n * static_cast<double>(iters) + (out[0] > 1e30f ? 1.0 : 0.0);
}

template <class I>
size_t scratch_floats(DType dtype, int64_t K) {  // one block of A slivers
  return static_cast<size_t>(I::MC * kc_for<I>(dtype, K));
}

template <class I>
const Kernels* make_kernels(const char* name) {
  static const Kernels k{name,          I::MR,          I::NR,         &kc_for<I>, &packed_b_bytes<I>,
                         &scratch_floats<I>, &pack_b_any<I>, &compute_any<I>, I::DR,     I::DC,
                         I::DKC,        &dot_rect<I>,   &fma_loop<I>,  I::DIRECT, &column_sums_any<I>,
                         &activation_any<I>, &activation_grad_any<I>};
  return &k;
}
