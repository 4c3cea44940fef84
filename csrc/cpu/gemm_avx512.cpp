// AVX-512 (F, BW, DQ, VL) instantiation of the GEMM kernels in gemm_kernel.h.
//
// The tile shape and the vector traits are in gemm_isa_avx512.h (shared with the AVX512_BF16
// unit).
//
// Compiled with its own target options (setup.py adds none globally): only this unit's
// functions use AVX-512, and they run only after gemm.cpp checked the CPU supports it.
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
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")
#include <immintrin.h>
#define DYNNET_AVX512_UNIT
#endif

#if defined(DYNNET_AVX512_UNIT)

namespace dynnet {
namespace gemm {
namespace {

#include "gemm_isa_avx512.h"
#include "gemm_kernel.h"

}  // namespace

const Kernels* avx512_kernels() { return make_kernels<Avx512>("avx512"); }

}  // namespace gemm
}  // namespace dynnet
#if !defined(DYNNET_CPU_HARNESS)
#pragma GCC pop_options
#endif

#else
namespace dynnet::gemm {
const Kernels* avx512_kernels() { return nullptr; }
}  // namespace dynnet::gemm
#endif
