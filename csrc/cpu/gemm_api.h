// The interface between the GEMM dispatcher (gemm.cpp) and the per-ISA kernel translation units
// (gemm_avx512.cpp, gemm_avx2.cpp, gemm_avx512bf16.cpp). Plain C++ only: the ISA units are
// compiled with their own target options and must not include torch headers (an inline function
// of a shared header compiled there with AVX-512 enabled could be the copy the linker keeps for
// the whole library, and crash a machine without AVX-512).
#pragma once

#include <cstddef>
#include <cstdint>

namespace dynnet {
namespace gemm {

enum class DType : int { F32, BF16, F16 };
// The smooth activations the kernels compute elementwise (activation_kernel.h), in the GEMM's
// store (Epilogue) and on their own.
enum class Act : int { Gelu, GeluTanh, Silu };
// The 16-bit storage types, as raw bits (the ISA units see no c10 types).
struct bf16_t { uint16_t x; };
struct f16_t { uint16_t x; };

// Element (i, j) of a strided matrix view is at p[i * rs + j * cs] (in elements of the dtype).
struct View {
  const void* p = nullptr;
  int64_t rs = 0, cs = 0;
};

// What the store does with the fp32 accumulator v of C(i, j), in this order:
//   v += bias[j]                           (bias != nullptr)
//   v = v < 0 ? 0 : v                      (relu; keeps NaN, as torch.relu)
//   v = y(i, j) <= 0 ? 0 : v               (mask_y.p != nullptr; ReLU's backward from its output,
//                                           as threshold_backward: NaN in y lets v through)
//   C(i, j) = round(v) to the dtype        (once: fp32 accumulates every K-block in registers or,
//                                           for float32 only, in C itself)
// With a smooth activation (smooth), the last step is instead
//   z(i, j) = round(v)                     (z.p != nullptr: linear_act's saved pre-activation;
//                                           float32's partial sums then accumulate in z)
//   C(i, j) = round(act(round(v)))         (from the rounded value, as stock's activation op
//                                           computes it from the linear's output)
// applied to each row tile's run of stored panels right after the stores, while it is in L1
// (activation_kernel.h).
struct Epilogue {
  const void* bias = nullptr;  // (N), the problem's dtype
  bool relu = false;
  View mask_y;  // (M, N) view with cs == 1, the problem's dtype
  bool smooth = false;
  Act act = Act::Gelu;  // when smooth
  View z;  // (M, N) view with cs == 1, the problem's dtype
};

// C (M, N) = A (M, K) @ B (K, N), then the epilogue; fp32 accumulation for every dtype.
// A may carry ReLU's backward mask: A(i, k) := a_mask_y(i, k) <= 0 ? 0 : A(i, k), applied while A
// is packed (the masked gradient is never written to memory).
struct Problem {
  int64_t M = 0, N = 0, K = 0;
  DType dtype = DType::F32;
  View a, b;
  View a_mask_y;
  void* c = nullptr;
  int64_t ldc = 0;  // C(i, j) at c[i * ldc + j]
  Epilogue epi;
};

// How a problem's products run (gemm.cpp's choose_form says which, per problem):
//   Packed: B packed into panels of `nr` columns (zero-padded past N), K split in blocks of `kc`
//           rows: block q holds rows [q kc, q kc + kcb) of every panel, panel after panel, kcb x
//           width each. Built once and read by every task (and, in the network op, by every layer
//           that shares it). The broadcast-A micro-kernel reads it.
//   Direct: nothing packed; `data` is B where it lies (float32, rows contiguous: b.cs == 1), read
//           by the same micro-kernel as Packed, row k of a panel at data + k * b.rs, the edge
//           panel's last vector loaded with a mask instead of zero padding; same `nr`, `kc` and
//           the same sums, bit for bit, as Packed.
//   Dot:    nothing packed (data is null): A and B are both read where they lie, contiguous along
//           k (the forward's x @ W^T), by the dot-product micro-kernel; `nr` is its tile's width
//           in columns of C and `kc` its K-block.
enum class Form : int { Packed, Dot, Direct };
struct PackedB {
  const void* data = nullptr;
  int64_t K = 0, N = 0, kc = 0, nr = 0;
  Form form = Form::Packed;
  int64_t panels() const { return nr ? (N + nr - 1) / nr : 0; }  // column units of C (panels or dot tiles)
};

// One instruction set's kernels. `compute` runs the tile rectangle rows [r0, r1) x panels
// [p0, p1) of C serially on the calling thread; each element of C gets the same sequence of
// FMAs whatever the rectangle, so results do not depend on how the work was split.
struct Kernels {
  const char* name;
  int64_t mr, nr;                                                        // micro-tile
  int64_t (*kc)(DType dtype, int64_t K);                                 // K-block length
  size_t (*packed_b_bytes)(DType dtype, int64_t K, int64_t N);
  size_t (*scratch_floats)(DType dtype, int64_t K);                     // per task, for packing A
  void (*pack_b)(const Problem& p, void* dst, int64_t p0, int64_t p1);  // panels [p0, p1)
  void (*compute)(const Problem& p, const PackedB& b, int64_t r0, int64_t r1, int64_t p0, int64_t p1,
                  float* scratch);
  // The dot form (float32 only): C rows [r0, r1) x columns [c0, c1) from A (a.cs == 1) and B
  // (b.rs == 1) where they lie; dot_mr x dot_nr tiles, K-blocks of dot_kc. Same promise as compute:
  // each element's sum does not depend on the rectangle.
  int64_t dot_mr, dot_nr, dot_kc;
  void (*dot)(const Problem& p, int64_t r0, int64_t r1, int64_t c0, int64_t c1);
  // FLOPs of `iters` rounds of 2 x MR x NVMAX (at most 24) independent register products of the
  // table's own instruction (no memory): FMA, or vdpbf16ps for avx512_bf16 (two multiply-adds
  // per lane) - the core's ceiling, to tell a kernel's speed from the hardware's.
  double (*fma_loop)(int64_t iters);
  // Whether `compute` runs the Direct form (float32 B read where it lies) well enough to offer
  // it: AVX-512's 64-float panel rows are four whole cache lines; AVX2's 16-float ones are one,
  // and strided reads of them lose to packing (gemm.cpp's choose_form).
  bool direct;
  // out[j - c0] = sum over rows (in order, fp32) of g(i, j), masked by ReLU's backward where y
  // is not null, for columns [c0, c1), rounded once to the dtype: a half-type grad_bias.
  void (*column_sums)(DType dtype, const void* g, int64_t ld, const void* y, int64_t y_ld, int64_t rows, int64_t c0,
                      int64_t c1, void* out);
  // y[i] = act(z[i]) and g[i] = gy[i] act'(z[i]) for i < n, contiguous, in fp32, each result
  // rounded once to the dtype (activation_kernel.h). y may be z (in place). The ops' forward
  // runs `activation`'s code in the GEMM's store (Epilogue::smooth); the CPU harness calls it alone.
  void (*activation)(DType dtype, Act act, const void* z, void* y, int64_t n);
  void (*activation_grad)(DType dtype, Act act, const void* gy, const void* z, void* g, int64_t n);
};

// Defined by the ISA units; each returns nullptr when built without support for its ISA.
const Kernels* avx512_kernels();
const Kernels* avx512bf16_kernels();  // bfloat16 on vdpbf16ps (AVX512_BF16), the rest as avx512
const Kernels* avx2_kernels();

}  // namespace gemm
}  // namespace dynnet
