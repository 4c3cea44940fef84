// AVX-512 (F, BW, DQ, VL) instantiation of the GEMM kernels in gemm_kernel.h.
//
// The tile shape and the vector traits are in gemm_isa_avx512.h (shared with the AVX512_BF16
// unit).
//
// Compiled with its own target options (setup.py adds none globally): only this unit's
// functions use AVX-512, and they run only after gemm.cpp checked the CPU supports it.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "gemm_api.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")
#include <immintrin.h>

namespace dynnet {
namespace gemm {
namespace {

#include "gemm_isa_avx512.h"
#include "gemm_kernel.h"

}  // namespace

const Kernels* avx512_kernels() { return make_kernels<Avx512>("avx512"); }

}  // namespace gemm
}  // namespace dynnet
#pragma GCC pop_options

#else
namespace dynnet::gemm {
const Kernels* avx512_kernels() { return nullptr; }
}  // namespace dynnet::gemm
#endif
