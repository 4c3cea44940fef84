// AVX-512 with AVX512_BF16: bfloat16 GEMMs on vdpbf16ps, the kernels of gemm_kernel.h with
// k-pairs: each 32-bit lane of a packed B row holds B(2kk, j) and B(2kk + 1, j), the broadcast A
// word A(i, 2kk) and A(i, 2kk + 1), and one vdpbf16ps adds both products to the fp32 accumulator
// - twice the multiply-adds of an fp32 FMA per instruction, with fp32 accumulation and the
// output rounded once, as for the other half-type paths. (vdpbf16ps treats bfloat16 denormals
// as zero and rounds its pair sum once, as Intel documents; within the bfloat16 tolerance.)
// Only bfloat16 runs here; float32 and float16 take the plain AVX-512 kernels.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "gemm_api.h"

#if defined(DYNNET_CPU_HARNESS)  // tests only: AVX-512 emulated on any x86-64 CPU (tests/cpu_harness.py)
#include "harness/avx512.h"
#define DYNNET_AVX512_UNIT
#elif defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")
#include <immintrin.h>
#define DYNNET_AVX512_UNIT
#endif

#if defined(DYNNET_AVX512_UNIT)

namespace dynnet {
namespace gemm {
namespace {

#include "gemm_isa_avx512.h"

struct Avx512Bf16 : Avx512 {
  using Word = uint32_t;  // a k-pair of bfloat16
  static constexpr int KPACK = 2;
  static V bcast(const Word* p) { return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(*p))); }
  static V loadw(const Word* p) { return _mm512_castsi512_ps(_mm512_loadu_si512(p)); }
  static V dot(V a, V b, V acc) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
  // Packing k-pairs (gemm_kernel.h's pack_a_pairs, pack_b_pairs). A bfloat16 is the high half
  // of its float32, so lo/hi give a word's two elements as float32 (for the ReLU mask) and pair
  // puts two such vectors' elements back into words, bit for bit.
  static V load_pairs(const bf16_t* p, int n) {  // n <= 2 W elements as W words, zero past n
    const __mmask32 m = n >= 2 * W ? ~__mmask32(0) : static_cast<__mmask32>((1u << n) - 1u);
    return _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, p));
  }
  static V lo(V w) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(w), 16)); }
  static V hi(V w) { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(w), _mm512_set1_epi32(int(0xffff0000u)))); }
  static V pair(V l, V h) {
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(l), 16),
                                               _mm512_castps_si512(hi(h))));
  }
  static void storew(Word* p, V v, int n) { store(reinterpret_cast<float*>(p), v, n); }
};

#include "gemm_kernel.h"

// The bf16 table: k-pair kernels for bfloat16, the plain AVX-512 ones for anything else.
int64_t kc(DType dtype, int64_t K) {
  return dtype == DType::BF16 ? kc_for<Avx512Bf16>(dtype, K) : avx512_kernels()->kc(dtype, K);
}
size_t packed_bytes(DType dtype, int64_t K, int64_t N) {
  return dtype == DType::BF16 ? packed_b_bytes<Avx512Bf16>(dtype, K, N) : avx512_kernels()->packed_b_bytes(dtype, K, N);
}
size_t scratch(DType dtype, int64_t K) {
  return dtype == DType::BF16 ? scratch_floats<Avx512Bf16>(dtype, K) : avx512_kernels()->scratch_floats(dtype, K);
}
void pack(const Problem& p, void* dst, int64_t p0, int64_t p1) {
  p.dtype == DType::BF16 ? pack_b_panels<Avx512Bf16, bf16_t>(p, dst, p0, p1) : avx512_kernels()->pack_b(p, dst, p0, p1);
}
void compute(const Problem& p, const PackedB& b, int64_t r0, int64_t r1, int64_t p0, int64_t p1, float* s) {
  p.dtype == DType::BF16 ? compute_rect<Avx512Bf16, bf16_t>(p, b, r0, r1, p0, p1, s)
                         : avx512_kernels()->compute(p, b, r0, r1, p0, p1, s);
}

}  // namespace

const Kernels* avx512bf16_kernels() {
  static const Kernels k{"avx512_bf16", Avx512Bf16::MR, Avx512Bf16::NR, &kc,      &packed_bytes, &scratch,
                         &pack,         &compute,        Avx512::DR,     Avx512::DC, Avx512::DKC,   &dot_rect<Avx512>,
                         &fma_loop<Avx512Bf16>, Avx512::DIRECT, &column_sums_any<Avx512>,
                         &activation_any<Avx512>, &activation_grad_any<Avx512>};
  return &k;
}

}  // namespace gemm
}  // namespace dynnet
#if !defined(DYNNET_CPU_HARNESS)
#pragma GCC pop_options
#endif

#else
namespace dynnet::gemm {
const Kernels* avx512bf16_kernels() { return nullptr; }
}  // namespace dynnet::gemm
#endif
