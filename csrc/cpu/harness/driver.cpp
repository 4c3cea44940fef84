// The CPU harness's entry point (tests/cpu_harness.py, through ctypes): one GEMM problem run by
// the AVX-512 kernels (gemm_avx512.cpp, gemm_avx512bf16.cpp compiled on harness/avx512.h) the way
// gemm.cpp runs it - B packed (its panels in `tasks` parts) or read where it lies, then the tile
// rectangles of `tasks` tasks, by rows or by panels, one after another. Tests only.
#include <cstdint>
#include <vector>

#include "../gemm_api.h"

using namespace dynnet::gemm;

extern "C" int dynnet_harness_gemm(int bf16_kernels, int dtype, int form, int64_t M, int64_t N, int64_t K,
                                   const void* a, int64_t a_rs, int64_t a_cs, const void* a_mask, int64_t am_rs,
                                   int64_t am_cs, const void* b, int64_t b_rs, int64_t b_cs, void* c, int64_t ldc,
                                   const void* bias, int relu, const void* mask_y, int64_t mask_rs, int act,
                                   void* z, int64_t z_rs, int64_t tasks, int by_panels) {
  const Kernels* k = bf16_kernels ? avx512bf16_kernels() : avx512_kernels();
  if (k == nullptr || tasks < 1) return 1;
  Problem p;
  p.M = M, p.N = N, p.K = K, p.dtype = static_cast<DType>(dtype);
  p.a = {a, a_rs, a_cs}, p.a_mask_y = {a_mask, am_rs, am_cs}, p.b = {b, b_rs, b_cs};
  p.c = c, p.ldc = ldc;
  p.epi.bias = bias, p.epi.relu = relu != 0, p.epi.mask_y = {mask_y, mask_rs, 1};
  if (act >= 0) p.epi.smooth = true, p.epi.act = static_cast<Act>(act), p.epi.z = {z, z_rs, 1};  // act < 0: none

  PackedB pb;
  std::vector<char> packed;
  switch (static_cast<Form>(form)) {
    case Form::Dot:  // gemm.cpp's choose_form offers it for these operands only
      if (p.dtype != DType::F32 || a_cs != 1 || b_rs != 1 || a_mask || mask_y) return 2;
      pb = {nullptr, K, N, k->dot_kc, k->dot_nr, Form::Dot};
      break;
    case Form::Direct:
      if (!k->direct || p.dtype != DType::F32 || b_cs != 1) return 2;
      pb = {b, K, N, k->kc(p.dtype, K), k->nr, Form::Direct};
      break;
    case Form::Packed: {
      packed.resize(k->packed_b_bytes(p.dtype, K, N) + 64);
      char* data = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(packed.data()) + 63) & ~uintptr_t(63));
      pb = {data, K, N, k->kc(p.dtype, K), k->nr, Form::Packed};
      const int64_t P = pb.panels();
      for (int64_t t = 0; t < tasks; ++t) k->pack_b(p, data, P * t / tasks, P * (t + 1) / tasks);
      break;
    }
    default: return 2;
  }
  std::vector<float> scratch(k->scratch_floats(p.dtype, K) + 16);
  const int64_t P = pb.panels();
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t r0 = by_panels ? 0 : M * t / tasks, r1 = by_panels ? M : M * (t + 1) / tasks;
    const int64_t p0 = by_panels ? P * t / tasks : 0, p1 = by_panels ? P * (t + 1) / tasks : P;
    if (r1 <= r0 || p1 <= p0) continue;
    if (pb.form == Form::Dot) k->dot(p, r0, r1, p0 * pb.nr, p1 * pb.nr < N ? p1 * pb.nr : N);
    else k->compute(p, pb, r0, r1, p0, p1, scratch.data());
  }
  return 0;
}

// The FLOPs the table's register-only ceiling loop counts for `iters` rounds (FMA, or vdpbf16ps
// for the bfloat16 table), after running it.
extern "C" double dynnet_harness_fma_loop(int bf16_kernels, int64_t iters) {
  const Kernels* k = bf16_kernels ? avx512bf16_kernels() : avx512_kernels();
  return k ? k->fma_loop(iters) : -1.0;
}

// The smooth activations (activation_kernel.h): out = act(z) (grad == 0) or gy * act'(z), n
// contiguous elements of `dtype`.
extern "C" int dynnet_harness_activation(int bf16_kernels, int dtype, int act, int grad, const void* gy, const void* z,
                                         void* out, int64_t n) {
  const Kernels* k = bf16_kernels ? avx512bf16_kernels() : avx512_kernels();
  if (k == nullptr) return 1;
  if (grad) k->activation_grad(static_cast<DType>(dtype), static_cast<Act>(act), gy, z, out, n);
  else k->activation(static_cast<DType>(dtype), static_cast<Act>(act), z, out, n);
  return 0;
}
