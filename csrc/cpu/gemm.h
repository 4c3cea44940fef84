// The CPU GEMM engine of the fused ops: C = epilogue(A @ B) with bias, ReLU, ReLU's backward
// mask and the rounding to the output dtype applied in the micro-kernel's store, and ReLU's
// backward mask on A applied while A is packed. See gemm.cpp for the design and the numbers
// behind it.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include "gemm_api.h"

namespace dynnet {
namespace gemm {

// The kernels that run `dtype` now, or nullptr when the op should use ATen (float64, a CPU
// without AVX2+FMA, or DYNNET_EXT_CPU_GEMM=aten). Chosen once per process from the CPU and the
// environment variable DYNNET_EXT_CPU_GEMM (auto | avx512 | avx2 | aten); set_isa overrides it.
const Kernels* kernels_for(at::ScalarType dtype);
// The kernels for an op whose largest product has `macs` multiply-adds: kernels_for, or nullptr
// (ATen) where ATen's BLAS is the faster - float32 from kAvx2Float32AtenMacs (AVX2) or
// kAvx512Float32AtenMacs (AVX-512; kIntelAvx512Float32AtenMacs on an Intel CPU) up, bfloat16 on a CPU with AMX-BF16 from kAmxBfloat16AtenMacs
// up - unless a form is forced (gemm.cpp, above those constants, says why).
const Kernels* kernels_for(at::ScalarType dtype, double macs);
// The active choice ("avx512", "avx2" or "aten") and the ones this CPU and build can run.
std::string isa();
// The kernels the ops use now for a dtype ("float32", "bfloat16", "float16", "float64"):
// "avx512", "avx512_bf16", "avx2", or "aten".
std::string kernels_name(const std::string& dtype);
std::vector<std::string> available_isas();
// Switches the engine (tests and benchmarks compare paths in one process). Returns the previous
// choice. Throws for a name this CPU cannot run.
std::string set_isa(const std::string& name);

// The engine's DType of a torch dtype (float32, bfloat16, float16); throws for any other.
DType dtype_of(at::ScalarType t);

// A (rows, cols) tensor as a View (any strides).
inline View view_of(const at::Tensor& t) { return {t.const_data_ptr(), t.stride(0), t.stride(1)}; }
// Its transpose as a View, without a copy.
inline View view_of_t(const at::Tensor& t) { return {t.const_data_ptr(), t.stride(1), t.stride(0)}; }

// The packed B operands of several problems, in memory owned by the calling thread (valid until
// its next BPack), packed by run(t, T): task t of T packs its share of all the panels.
class BPack {
 public:
  BPack(const Kernels* k, const std::vector<const Problem*>& problems);
  void run(int64_t t, int64_t T) const;
  void run_problem(size_t i) const;  // every panel of problem i, on the calling thread
  const PackedB& operator[](size_t i) const { return packed_[i]; }

 private:
  const Kernels* k_;
  std::vector<const Problem*> problems_;
  std::vector<PackedB> packed_;
  std::vector<std::pair<size_t, int64_t>> units_;  // (problem, panel), in order
};

// Runs each phase on tasks 0..T-1, a phase finishing on every task before the next starts. In
// one parallel region with barriers between the phases when torch's OpenMP team has T threads
// (one region start per op instead of one per phase); else one region per phase. Exceptions are
// rethrown after the last phase (the remaining work of a failed call is skipped).
void run_phases(int64_t T, const std::vector<std::function<void(int64_t)>>& phases);

// The problem C (M, N) = A (M, K) @ B (K, N), ReLU's backward mask on A when a_mask_y is given,
// no epilogue (set p.epi after); C row-major at c with row stride ldc.
inline Problem product(int64_t M, int64_t N, int64_t K, at::ScalarType dtype, View a, View b, void* c, int64_t ldc,
                       View a_mask_y = {}) {
  Problem p;
  p.M = M, p.N = N, p.K = K, p.dtype = dtype_of(dtype);
  p.a = a, p.b = b, p.a_mask_y = a_mask_y, p.c = c, p.ldc = ldc;
  return p;
}

// Rows x panels rectangle of task t of T for a problem (T near-equal parts, by rows when there
// are enough rows, by panels otherwise).
struct Rect {
  int64_t r0, r1, p0, p1;
};
Rect split(const Kernels* k, const Problem& p, const PackedB& b, int64_t t, int64_t T);
// Rows of the micro-tile that computes a problem packed as `b`.
int64_t row_tile(const Kernels* k, const PackedB& b);
// Which form runs a problem (gemm_api.h's Form).
Form choose_form(const Kernels* k, const Problem& p);
// Forces a form on every problem it can run ("dot", "packed", "direct"; the others follow the
// rule) or restores the rule ("auto"); returns the previous setting. DYNNET_EXT_CPU_GEMM_FORM
// sets it at start.
std::string set_form(const std::string& name);
std::string form();  // the setting: auto, dot, packed or direct
// The form that would run C (M, N) = A (M, K) @ B (K, N) now, A row-major, B with contiguous
// rows (`b_rows`: the backward's operands) or columns (B = W^T, the forward's): "dot", "packed",
// "direct", or "aten" when the engine does not run `dtype`.
std::string form_for(int64_t M, int64_t N, int64_t K, const std::string& dtype, bool b_rows);

// Computes rectangle `r` of problem `p` on the calling thread.
void compute(const Kernels* k, const Problem& p, const PackedB& b, const Rect& r);
inline void compute_rows(const Kernels* k, const Problem& p, const PackedB& b, int64_t r0, int64_t r1) {
  compute(k, p, b, {r0, r1, 0, b.panels()});
}

// Packs and computes the problems. As many problems of equal FLOPs as tasks (the backward's
// grad_x and grad_weight on two threads): side by side, each task packing and computing one whole
// problem, with no barrier. Otherwise each is split across the threads when worth it: the packing
// in one parallel region, the products in a second. Bitwise the same results for any thread
// count (no split changes an element's sum).
void run(const Kernels* k, const std::vector<const Problem*>& problems);

// The FMA ceiling of the engine `isa` (avx512 or avx2; avx512_bf16: the vdpbf16ps ceiling of
// bfloat16) on `threads` threads, in GFLOP/s: a register-only loop run for about `seconds` of
// CPU time on each thread at once, each thread's rate from its own CPU time (so other processes
// on the cores do not lower it).
double fma_peak_gflops(const std::string& isa, int64_t threads, double seconds);

// Tasks worth running for `flops` of work on the current thread count (1 inside a parallel
// region or for small work).
int64_t num_tasks(double flops);

}  // namespace gemm
}  // namespace dynnet
