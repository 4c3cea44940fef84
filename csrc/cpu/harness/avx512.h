// The AVX-512 intrinsics for the CPU engine's AVX-512 units (gemm_avx512.cpp,
// gemm_avx512bf16.cpp) when they are compiled for the CPU harness (tests/cpu_harness.py): SIMDe's
// portable implementations under the intrinsics' own names, so the units' code - vector traits,
// packing, micro-kernels, tile loops - runs unchanged on a CPU without AVX-512 or AVX512_BF16.
// Tests only, never in the wheel. What only the real instructions show (speed; vdpbf16ps's
// denormal flushing and its rounding of the pair sum) is not emulated exactly: the harness's
// results are compared with a reference within the dtype's tolerance, and with each other bit
// for bit.
#pragma once

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <cstdint>
#include <cstring>

// Masked loads and stores touch only their lanes' memory, as the instructions do (a lane whose
// bit is clear may lie past the end of an operand); SIMDe's read and write whole vectors. And the
// few intrinsics the units use that SIMDe (0.8.2) does not alias.
template <typename T, int L, typename V>
static inline V dynnet_harness_maskz_load(uint32_t m, const void* p) {
  T lanes[L] = {};
  for (int i = 0; i < L; ++i)
    if (m >> i & 1) std::memcpy(&lanes[i], static_cast<const T*>(p) + i, sizeof(T));
  V v;
  std::memcpy(&v, lanes, sizeof(v));
  return v;
}
template <typename T, int L, typename V>
static inline void dynnet_harness_mask_store(void* p, uint32_t m, V v) {
  T lanes[L];
  std::memcpy(lanes, &v, sizeof(v));
  for (int i = 0; i < L; ++i)
    if (m >> i & 1) std::memcpy(static_cast<T*>(p) + i, &lanes[i], sizeof(T));
}
#undef _mm512_maskz_loadu_ps
#undef _mm512_mask_storeu_ps
#undef _mm256_maskz_loadu_ps
#undef _mm256_mask_storeu_ps
#undef _mm256_maskz_loadu_epi16
#undef _mm256_mask_storeu_epi16
#undef _mm512_maskz_loadu_epi16
#define _mm512_maskz_loadu_ps(m, p) (dynnet_harness_maskz_load<float, 16, __m512>((m), (p)))
#define _mm512_mask_storeu_ps(p, m, v) (dynnet_harness_mask_store<float, 16, __m512>((p), (m), (v)))
#define _mm256_maskz_loadu_ps(m, p) (dynnet_harness_maskz_load<float, 8, __m256>((m), (p)))
#define _mm256_mask_storeu_ps(p, m, v) (dynnet_harness_mask_store<float, 8, __m256>((p), (m), (v)))
#define _mm256_maskz_loadu_epi16(m, p) (dynnet_harness_maskz_load<uint16_t, 16, __m256i>((m), (p)))
#define _mm256_mask_storeu_epi16(p, m, v) (dynnet_harness_mask_store<uint16_t, 16, __m256i>((p), (m), (v)))
#define _mm512_maskz_loadu_epi16(m, p) (dynnet_harness_maskz_load<uint16_t, 32, __m512i>((m), (p)))

static inline __m256i dynnet_harness_cvtepi32_epi16(__m512i v) {  // truncation, as vpmovdw
  int32_t s[16];
  int16_t d[16];
  _mm512_storeu_si512(s, v);
  for (int i = 0; i < 16; ++i) d[i] = static_cast<int16_t>(s[i]);
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d));
}
#define _mm512_cvtepi32_epi16 dynnet_harness_cvtepi32_epi16

#define _mm512_cvtps_ph(v, r) \
  _mm256_set_m128i(_mm256_cvtps_ph(_mm512_extractf32x8_ps(v, 1), r), _mm256_cvtps_ph(_mm512_castps512_ps256(v), r))
