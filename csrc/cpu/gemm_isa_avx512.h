// AVX-512 vector traits for gemm_kernel.h (see gemm_avx512.cpp). Included by the AVX-512 units
// only, inside their anonymous namespace, after their `#pragma GCC target`.
//
// Micro-tile 6 rows x 4 vectors (6 x 64 floats): 24 zmm accumulators, 4 for the B row, the A
// element broadcast; per k-step 24 FMAs against 10 loads, so the FMA pipes, not the load ports,
// set the pace. Six A rows keep the row pointers in general registers. K-block 256: a 256 x 64
// B panel is 64 KiB and streams from L2 while the 6 x 256 A sliver stays in L1.

#ifndef DYNNET_AVX512_MR  // tile shape: overridable to tune, fixed in a build
#define DYNNET_AVX512_MR 6
#define DYNNET_AVX512_NV 4
#define DYNNET_AVX512_KC 256
#endif

struct Avx512 {
  static constexpr int W = 16, MR = DYNNET_AVX512_MR, NVMAX = DYNNET_AVX512_NV, NR = NVMAX * W;
  static constexpr int64_t MC = 16 * MR;  // rows of A packed together (masked or converted A)
  static constexpr int64_t KC = DYNNET_AVX512_KC, L2_FLOATS = 1 << 18;  // 1 MiB of L2 per core
  static constexpr bool DIRECT = true;  // float32 B may be read where it lies (gemm_api.h's Form)
  using V = __m512;
  using Word = float;  // one k per packed element
  static constexpr int KPACK = 1;
  static __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const float* p, int n) { return n == W ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask(n), p); }
  static V load(const bf16_t* p, int n) {
    const __m256i h = n == W ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                             : _mm256_maskz_loadu_epi16(mask(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V load(const f16_t* p, int n) {
    const __m256i h = n == W ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                             : _mm256_maskz_loadu_epi16(mask(n), p);
    return _mm512_cvtph_ps(h);
  }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V loadw(const Word* p) { return load(p); }
  static V dot(V a, V b, V acc) { return fma(a, b, acc); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V relu(V v) { return _mm512_max_ps(zero(), v); }  // max returns its 2nd operand for NaN: keeps NaN
  static V mask_le0(V y, V v) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(y, zero(), _CMP_LE_OQ), v, zero()); }
  // The dot form's tile (gemm_kernel.h): 4 rows x 6 columns of C, 24 accumulators, 4 + 6 vector
  // loads per 24 FMAs; A's 4 x DKC block (16 KiB) stays in L1, B's rows stream from L2.
  static constexpr int DR = 4, DC = 6;
  static constexpr int64_t DKC = 1024;
  static __m256 fold(V v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); }
  static __m256 load8(const float* p, int n) { return _mm256_maskz_loadu_ps(static_cast<__mmask8>((1u << n) - 1u), p); }
  static void store8(float* p, __m256 v, int n) { _mm256_mask_storeu_ps(p, static_cast<__mmask8>((1u << n) - 1u), v); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, V v, int n) { n == W ? _mm512_storeu_ps(p, v) : _mm512_mask_storeu_ps(p, mask(n), v); }
  static void store(bf16_t* p, V v, int n) {  // round to nearest even; NaN stays a (quiet) NaN
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    const __m256i h = _mm512_cvtepi32_epi16(r);
    n == W ? _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h) : _mm256_mask_storeu_epi16(p, mask(n), h);
  }
  static void store(f16_t* p, V v, int n) {
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    n == W ? _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h) : _mm256_mask_storeu_epi16(p, mask(n), h);
  }
  // dst[k * ldd + j] = src[j * lds + k] for j < rows, k < kn (both <= 16); dst[k * ldd + j] = 0
  // for rows <= j < 16.
  static void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd, int rows, int kn) {
    V r[16], t[16];
    for (int i = 0; i < 16; ++i)
      r[i] = i >= rows ? zero() : kn == W ? _mm512_loadu_ps(src + i * lds) : _mm512_maskz_loadu_ps(mask(kn), src + i * lds);
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
      r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
      r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int h = 0; h < 16; h += 8)
      for (int i = 0; i < 4; ++i) {
        t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
        t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
      }
    for (int i = 0; i < 8; ++i) {
      r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
      r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
    for (int i = 0; i < kn; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
  }
};
