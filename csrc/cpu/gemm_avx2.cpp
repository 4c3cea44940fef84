// AVX2 + FMA instantiation of the GEMM kernels in gemm_kernel.h, for x86-64 CPUs without
// AVX-512 (and forced with DYNNET_EXT_CPU_GEMM=avx2, which is how CI tests it on AVX-512 ones).
//
// Micro-tile 6 rows x 2 vectors (6 x 16 floats): 12 ymm accumulators, 2 for the B row, 1 for
// the broadcast A element, out of 16 registers. K-block 256: a 256 x 16 B panel is 16 KiB.
//
// Compiled with its own target options (see gemm_avx512.cpp for why no torch header is here).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "gemm_api.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

namespace dynnet {
namespace gemm {
namespace {

struct Avx2 {
  static constexpr int W = 8, MR = 6, NVMAX = 2, NR = NVMAX * W;
  static constexpr int64_t MC = 16 * MR;  // rows of A packed together (masked or converted A)
  static constexpr int64_t KC = 256, L2_FLOATS = 1 << 18;
  static constexpr bool DIRECT = false;  // B always packed: see Kernels::direct
  using V = __m256;
  using Word = float;  // one k per packed element
  static constexpr int KPACK = 1;
  static __m256i mask(int n) {  // lanes [0, n) set
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const float* p, int n) { return n == W ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask(n)); }
  static __m128i load_bits(const uint16_t* p, int n) {
    if (n == W) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    alignas(16) uint16_t tmp[8] = {};
    std::memcpy(tmp, p, n * sizeof(uint16_t));
    return _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
  }
  static V load(const bf16_t* p, int n) {
    const __m128i h = load_bits(reinterpret_cast<const uint16_t*>(p), n);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V load(const f16_t* p, int n) { return _mm256_cvtph_ps(load_bits(reinterpret_cast<const uint16_t*>(p), n)); }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V loadw(const Word* p) { return load(p); }
  static V dot(V a, V b, V acc) { return fma(a, b, acc); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V relu(V v) { return _mm256_max_ps(zero(), v); }  // max returns its 2nd operand for NaN: keeps NaN
  static V mask_le0(V y, V v) { return _mm256_blendv_ps(v, zero(), _mm256_cmp_ps(y, zero(), _CMP_LE_OQ)); }
  // The dot form's tile (gemm_kernel.h): 3 rows x 4 columns of C, 12 accumulators + 3 A vectors
  // + 1 B vector = the 16 registers.
  static constexpr int DR = 3, DC = 4;
  static constexpr int64_t DKC = 1024;
  static __m256 fold(V v) { return v; }
  static __m256 load8(const float* p, int n) { return load(p, n); }
  static void store8(float* p, __m256 v, int n) { store(p, v, n); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(float* p, V v, int n) { n == W ? _mm256_storeu_ps(p, v) : _mm256_maskstore_ps(p, mask(n), v); }
  static void store_bits(uint16_t* p, __m128i h, int n) {
    if (n == W) return _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
    std::memcpy(p, tmp, n * sizeof(uint16_t));
  }
  static void store(bf16_t* p, V v, int n) {  // round to nearest even; NaN stays a (quiet) NaN
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    store_bits(reinterpret_cast<uint16_t*>(p), _mm256_castsi256_si128(packed), n);
  }
  static void store(f16_t* p, V v, int n) {
    store_bits(reinterpret_cast<uint16_t*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), n);
  }
  // dst[k * ldd + j] = src[j * lds + k] for j < rows, k < kn (both <= 8); dst[k * ldd + j] = 0
  // for rows <= j < 8.
  static void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd, int rows, int kn) {
    V r[8], t[8];
    for (int i = 0; i < 8; ++i)
      r[i] = i >= rows ? zero() : kn == W ? _mm256_loadu_ps(src + i * lds) : _mm256_maskload_ps(src + i * lds, mask(kn));
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
      r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
      t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
      t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
    }
    for (int i = 0; i < kn; ++i) _mm256_storeu_ps(dst + i * ldd, t[i]);
  }
};

#include "gemm_kernel.h"

}  // namespace

const Kernels* avx2_kernels() { return make_kernels<Avx2>("avx2"); }

}  // namespace gemm
}  // namespace dynnet
#pragma GCC pop_options

#else
namespace dynnet::gemm {
const Kernels* avx2_kernels() { return nullptr; }
}  // namespace dynnet::gemm
#endif
