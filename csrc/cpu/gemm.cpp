// The CPU GEMM engine: dispatch to an instruction set, packing, work split across threads.
//
// C (M, N) = epilogue(A (M, K) @ B (K, N)), fp32 accumulation (float32, bfloat16, float16;
// float64 stays with ATen's BLAS). BLIS-style: B is packed into panels of NR columns (k-major,
// zero-padded), A is read where it lies (strided broadcasts) or packed a block of rows at a time
// when it must be converted or masked (the half types: once per block, all of K), and a
// register-blocked micro-kernel (gemm_kernel.h) computes an MR x NR tile, applying the epilogue
// (bias, ReLU, ReLU's backward mask, rounding) in its store.
//
// Why our own kernels and not ATen's BLAS (float32, on the 2-core AMD EPYC with AVX-512 these
// machines are): MKL, which torch.mm and stock nn.Linear use, runs the seed's input layer well
// below the cores' FMA ceiling (benchmarks/results/README.md, thresholds: own-gemm-engine);
// oneDNN and OpenBLAS reach more but are not reachable from an
// extension (libtorch exports no dnnl_* entry points, and a second BLAS would bring a second
// thread pool). A micro-kernel of our own also gives what a
// library call cannot: the bias/ReLU/mask epilogue in the store (no second pass over C), the
// mask applied while packing the gradient, one packed weight shared by every layer that uses
// it, no per-call primitive creation and no per-call allocation (packing buffers are thread-
// local and reused), and the same bits for any thread count.
//
// The float32 forward (A = x, B = W^T read as W's rows) has a second form, the dot form
// (gemm_kernel.h's dot_rect): nothing packed, each element of C a vector of lane partial sums
// along K. choose_form picks it by shape (few rows, narrow N, or long K with a small output).
// A float32 B whose rows are contiguous (the backward's W and x, the network's activations) is
// read where it lies by the packed form's micro-kernel - the direct form, AVX-512 only - unless
// many rows of C reuse a long B. DYNNET_EXT_CPU_GEMM_FORM=dot|packed|direct forces a form on
// every problem it can run.
//
// Instruction sets (one translation unit each, compiled with its own target options; the
// library itself needs only x86-64): avx512 (6 x 64 tile), avx2 (6 x 16), chosen at run time
// from cpuid; DYNNET_EXT_CPU_GEMM=avx2 (or avx512, aten) forces one, and `aten` restores the
// ATen BLAS path everywhere.
//
// Threads: the work of a call is split over C's rows (or its column panels when it has too few
// rows) into one rectangle per thread, run with at::parallel_for (torch's own OpenMP pool: no
// second threading runtime). K is never split, so each element of C gets the same FMAs in the
// same order whatever the split: the results are bitwise identical for any thread count.

#include "gemm.h"

#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

#include <time.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>

#include "building_blocks.h"

namespace dynnet {
namespace gemm {
namespace {

enum Isa : int { kAten = 0, kAvx2 = 1, kAvx512 = 2 };
const char* kIsaNames[] = {"aten", "avx2", "avx512"};

bool cpu_has(Isa isa) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  switch (isa) {
    case kAten: return true;
    case kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && avx2_kernels();
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && avx512_kernels();
  }
#endif
  return isa == kAten;
}

bool has_avx512_bf16() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool yes = avx512bf16_kernels() != nullptr && __builtin_cpu_supports("avx512bf16");
  return yes;
#else
  return false;
#endif
}

bool intel_cpu() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return yes;
#else
  return false;
#endif
}

Isa best_isa() { return cpu_has(kAvx512) ? kAvx512 : cpu_has(kAvx2) ? kAvx2 : kAten; }

Isa parse_isa(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) return static_cast<Isa>(i);
  TORCH_CHECK(false, "dynnet: DYNNET_EXT_CPU_GEMM must be auto, avx512, avx2 or aten, got '", name, "'");
}

Isa initial_isa() {
  const char* env = std::getenv("DYNNET_EXT_CPU_GEMM");
  if (env == nullptr || *env == '\0' || std::string(env) == "auto") return best_isa();
  const Isa isa = parse_isa(env);
  TORCH_CHECK(cpu_has(isa), "dynnet: DYNNET_EXT_CPU_GEMM=", env, " but this CPU (or build) cannot run it; available: ",
              c10::Join(", ", available_isas()), ". Unset it to choose automatically.");
  return isa;
}

std::atomic<int>& current_isa() {
  static std::atomic<int> isa{initial_isa()};
  return isa;
}

// The dot form's shape thresholds (choose_form).
constexpr int64_t kDotMaxNarrowN = 16;
constexpr int64_t kDotMinK = 256;
constexpr int64_t kDotMaxOutput = int64_t(1) << 20;
// The direct form's (choose_form): B read where it lies below this many rows of C, or for
// K-blocks this short at any M.
constexpr int64_t kDirectMinRows = 512;
constexpr int64_t kDirectMaxK = 256;

enum FormChoice : int { kFormAuto = 0, kFormDot = 1, kFormPacked = 2, kFormDirect = 3 };
const char* kFormNames[] = {"auto", "dot", "packed", "direct"};
constexpr int kNumForms = 4;

int initial_form() {
  const char* env = std::getenv("DYNNET_EXT_CPU_GEMM_FORM");
  if (env == nullptr || *env == '\0') return kFormAuto;
  for (int i = 0; i < kNumForms; ++i)
    if (std::string(env) == kFormNames[i]) return i;
  TORCH_CHECK(false, "dynnet: DYNNET_EXT_CPU_GEMM_FORM must be auto, dot, packed or direct, got '", env, "'");
}

std::atomic<int>& form_override() {
  static std::atomic<int> form{initial_form()};
  return form;
}

// Grows-only buffer, 64-byte aligned, one per thread: packed B for the calling thread, A
// slivers for a worker. No allocation once a thread has seen its largest problem.
struct Buffer {
  std::unique_ptr<char[]> raw;
  size_t size = 0;
  char* get(size_t bytes) {
    if (bytes + 64 > size) {
      size = std::max(bytes + 64, size * 3 / 2);
      raw.reset(new char[size]);
    }
    return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw.get()) + 63) & ~uintptr_t(63));
  }
};

float* scratch(const Kernels* k, const Problem& p) {
  thread_local Buffer buf;
  return reinterpret_cast<float*>(buf.get(k->scratch_floats(p.dtype, p.K) * sizeof(float)));
}

// Below about 5 us of one core's work a second thread does not pay: waking it and meeting it at
// a barrier costs a few us (benchmarks/results/README.md, thresholds: min-task-flops).
constexpr double kMinTaskFlops = 5e5;

}  // namespace

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, "dynnet: the CPU GEMM engine has no kernels for ", t);
  }
}

const Kernels* kernels_for(at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) return nullptr;
  switch (current_isa().load(std::memory_order_relaxed)) {
    case kAvx512:
      // bfloat16 on the BF16 dot-product instructions where the CPU has them.
      return dtype == at::kBFloat16 && has_avx512_bf16() ? avx512bf16_kernels() : avx512_kernels();
    case kAvx2: return avx2_kernels();
    default: return nullptr;
  }
}

// AVX2's 6 x 16 float32 micro-kernel runs behind ATen's BLAS on large problems: on a Zen 3
// (2 threads) a layer's forward and backward at 512-2048 x 768 x 3072 takes 1.1-1.35x stock's
// time in every form, while the small ones (the seed's 64 x 1000 x 100) gain from the fused
// store; the two meet near 2^25 multiply-adds (benchmarks/results/README.md, thresholds:
// avx2-float32-aten). bfloat16 and float16 stay: ATen has no fast path for them there.
constexpr double kAvx2Float32AtenMacs = double(int64_t(1) << 25);
// AVX-512's float32 kernels, likewise from 2^27, and on an Intel CPU from 9 x 2^23 (75.5M): on
// a 2-core Intel Xeon MKL ran 1024^3 at 423 GFLOP/s against the engine's 383, and from there a
// layer's forward + backward was a few percent slower on the engine than on ATen's path, while
// at 64 x 1024 -> 1024 (2^26, just below) ATen's path lost more than the engine did; on the Zen 4 the two GEMMs were at parity (194 and 195 GFLOP/s), so there the rule gives
// up the fusion's few percent from 2^27 only (thresholds: avx512-float32-aten).
constexpr double kAvx512Float32AtenMacs = double(int64_t(1) << 27);
constexpr double kIntelAvx512Float32AtenMacs = double(int64_t(9) << 23);
// On a CPU with AMX-BF16 tiles (Xeon Sapphire Rapids and later), ATen's bfloat16 GEMM runs on
// them (oneDNN) and the engine's vdpbf16ps kernels cannot keep up: on a 2-core Xeon a layer's
// forward and backward took 1.15x ATen's time at 16 x 1000 x 100 (1.6M multiply-adds), 1.75x at
// the seed's 64 x 1000 x 100 and 2.5-4.5x from 2^24 on, while below 2^20 (64 x 100 x 100, one
// row) the engine is ahead (thresholds: amx-bfloat16-aten).
constexpr double kAmxBfloat16AtenMacs = double(int64_t(1) << 20);

// Whether ATen's bfloat16 GEMM has AMX tiles: the CPU has AMX-BF16 and the OS grants the tile
// state (init_amx asks for it, as oneDNN does).
bool aten_has_amx_bf16() {
  static const bool yes = [] {
    const auto caps = at::cpu::get_cpu_capabilities();
    const auto it = caps.find("amx_bf16");
    return it != caps.end() && it->second.isBool() && it->second.toBool() && at::cpu::init_amx();
  }();
  return yes;
}

const Kernels* kernels_for(at::ScalarType dtype, double macs) {
  const Kernels* k = kernels_for(dtype);
  if (k == nullptr || form_override().load(std::memory_order_relaxed) != kFormAuto) return k;
  const double float32_aten_macs = k == avx2_kernels() ? kAvx2Float32AtenMacs
                                   : intel_cpu()        ? kIntelAvx512Float32AtenMacs
                                                        : kAvx512Float32AtenMacs;
  const bool big_float32 = dtype == at::kFloat && macs >= float32_aten_macs;
  const bool amx_bfloat16 = dtype == at::kBFloat16 && macs >= kAmxBfloat16AtenMacs && aten_has_amx_bf16();
  return big_float32 || amx_bfloat16 ? nullptr : k;
}

std::string kernels_name(const std::string& dtype) {
  const at::ScalarType t = dtype == "float32"    ? at::kFloat
                           : dtype == "bfloat16" ? at::kBFloat16
                           : dtype == "float16"  ? at::kHalf
                           : dtype == "float64"  ? at::kDouble
                                                 : at::kByte;
  TORCH_CHECK(t != at::kByte, "dynnet: dtype must be float32, bfloat16, float16 or float64, got '", dtype, "'");
  const Kernels* k = kernels_for(t);
  return k ? k->name : "aten";
}

std::string isa() { return kIsaNames[current_isa().load()]; }

std::string form() { return kFormNames[form_override().load()]; }

std::string form_for(int64_t M, int64_t N, int64_t K, const std::string& dtype, bool b_rows) {
  const std::string name = kernels_name(dtype);  // checks the name
  const at::ScalarType t = dtype == "float32" ? at::kFloat : dtype == "bfloat16" ? at::kBFloat16 : at::kHalf;
  const Kernels* k = name == "aten" ? nullptr : kernels_for(t, double(M) * double(N) * double(K));
  if (k == nullptr) return "aten";
  Problem p;
  p.M = M, p.N = N, p.K = K, p.dtype = dtype_of(t);
  p.a = {nullptr, K, 1};
  p.b = b_rows ? View{nullptr, N, 1} : View{nullptr, 1, K};
  switch (choose_form(k, p)) {
    case Form::Dot: return "dot";
    case Form::Direct: return "direct";
    default: return "packed";
  }
}

std::string set_form(const std::string& name) {
  for (int i = 0; i < kNumForms; ++i)
    if (name == kFormNames[i]) return kFormNames[form_override().exchange(i)];
  TORCH_CHECK(false, "dynnet: the GEMM form must be auto, dot, packed or direct, got '", name, "'");
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (int i = 2; i >= 0; --i)
    if (cpu_has(static_cast<Isa>(i))) out.emplace_back(kIsaNames[i]);
  return out;
}

std::string set_isa(const std::string& name) {
  const Isa isa = name == "auto" ? best_isa() : parse_isa(name);
  TORCH_CHECK(cpu_has(isa), "dynnet: this CPU (or build) cannot run the ", name, " GEMM kernels; available: ",
              c10::Join(", ", available_isas()));
  return kIsaNames[current_isa().exchange(isa)];
}

int64_t num_tasks(double flops) {
  if (at::in_parallel_region()) return 1;
  const auto by_work = static_cast<int64_t>(flops / kMinTaskFlops);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_work));
}

Form choose_form(const Kernels* k, const Problem& p) {
  const bool dot_ok = k->dot && p.dtype == DType::F32 && p.a.cs == 1 && p.b.rs == 1 && !p.a_mask_y.p &&
                      !p.epi.mask_y.p;
  const bool direct_ok = k->direct && p.dtype == DType::F32 && p.b.cs == 1;
  // A forced form runs every problem it can; the rest follow the rule.
  const int f = form_override().load(std::memory_order_relaxed);
  if (f == kFormPacked) return Form::Packed;
  if (f == kFormDot && dot_ok) return Form::Dot;
  if (f == kFormDirect && direct_ok) return Form::Direct;
  // The shape rule, from A/B runs of the forms forced (benchmarks/results/README.md,
  // thresholds: direct-form, dot-form). B with contiguous rows (the backward's W and x, the
  // network's activations): read where it lies unless many rows of C reuse a long B - packing
  // costs a pass over B, and a packed B one thread wrote is read by the other from its cache.
  if (direct_ok && (p.M < kDirectMinRows || p.K <= kDirectMaxK)) return Form::Direct;
  if (!dot_ok) return Form::Packed;
  // The forward (B = W^T, columns contiguous). Packing B pays off when many rows reuse it; the
  // dot form's lane sums, one per element and K-block, when K is long; narrow N wastes most of a
  // packed panel's lanes.
  const bool few_rows = p.M < k->mr;
  const bool narrow = p.N <= kDotMaxNarrowN;
  const bool long_k = p.K >= kDotMinK && p.M * p.N < kDotMaxOutput;
  return few_rows || narrow || long_k ? Form::Dot : Form::Packed;
}

BPack::BPack(const Kernels* k, const std::vector<const Problem*>& problems) : k_(k), problems_(problems) {
  thread_local Buffer buf;
  std::vector<Form> forms;
  std::vector<size_t> offset(problems.size() + 1, 0);
  for (size_t i = 0; i < problems.size(); ++i) {
    const Problem& p = *problems[i];
    forms.push_back(choose_form(k, p));
    const size_t bytes = forms[i] == Form::Packed ? k->packed_b_bytes(p.dtype, p.K, p.N) : 0;
    offset[i + 1] = offset[i] + (bytes + 63) / 64 * 64;
  }
  char* base = buf.get(offset.back());
  for (size_t i = 0; i < problems.size(); ++i) {
    const Problem& p = *problems[i];
    if (forms[i] == Form::Dot) {
      packed_.push_back({nullptr, p.K, p.N, k->dot_kc, k->dot_nr, Form::Dot});
      continue;
    }
    if (forms[i] == Form::Direct) {
      packed_.push_back({p.b.p, p.K, p.N, k->kc(p.dtype, p.K), k->nr, Form::Direct});
      continue;
    }
    packed_.push_back({base + offset[i], p.K, p.N, k->kc(p.dtype, p.K), k->nr, Form::Packed});
    for (int64_t q = 0; q < packed_[i].panels(); ++q) units_.emplace_back(i, q);
  }
}

void BPack::run(int64_t t, int64_t T) const {
  const size_t n = units_.size(), u0 = n * t / T, u1 = n * (t + 1) / T;
  for (size_t u = u0; u < u1;) {  // consecutive panels of one problem in one call
    const size_t i = units_[u].first;
    size_t v = u;
    while (v < u1 && units_[v].first == i) ++v;
    k_->pack_b(*problems_[i], const_cast<void*>(packed_[i].data), units_[u].second, units_[v - 1].second + 1);
    u = v;
  }
}

void BPack::run_problem(size_t i) const {
  if (packed_[i].form == Form::Packed && packed_[i].panels() > 0)
    k_->pack_b(*problems_[i], const_cast<void*>(packed_[i].data), 0, packed_[i].panels());
}

void run_phases(int64_t T, const std::vector<std::function<void(int64_t)>>& phases) {
  if (T <= 1) {
    for (const auto& phase : phases) phase(0);
    return;
  }
  std::exception_ptr error;
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  const auto guarded = [&](const std::function<void(int64_t)>& phase, int64_t t) {
    try {  // a task that throws must still reach the barriers, or the others would wait forever
      if (!error) phase(t);
    } catch (...) {
      if (!failed.test_and_set()) error = std::current_exception();
    }
  };
  size_t done = 0;  // phases finished for every task
#if defined(_OPENMP) && AT_PARALLEL_OPENMP
  // One region, a barrier between phases, when torch's OpenMP team has exactly T threads and
  // each runs one task (at::parallel_for gives every thread one chunk of a T-long range then);
  // every thread sees the same team, so all take the same branch.
  std::atomic<int64_t> synced{0};
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::NoGradGuard no_grad;
    if (!(omp_in_parallel() && omp_get_num_threads() == T && end - begin == 1)) {
      for (int64_t t = begin; t < end; ++t) guarded(*phases.begin(), t);
      return;
    }
    bool first = true;
    for (const auto& phase : phases) {
      if (!first) {
#pragma omp barrier
      }
      first = false;
      guarded(phase, begin);
    }
    synced.fetch_add(1);
  });
  done = synced.load() == T ? phases.size() : 1;
#endif
  size_t i = 0;
  for (const auto& phase : phases)  // one region per phase left
    if (i++ >= done) parallel_tasks(T, [&](int64_t t) { guarded(phase, t); });
  if (error) std::rethrow_exception(error);
}

int64_t row_tile(const Kernels* k, const PackedB& b) { return b.form == Form::Dot ? k->dot_mr : k->mr; }

Rect split(const Kernels* k, const Problem& p, const PackedB& b, int64_t t, int64_t T) {
  const int64_t P = b.panels();
  // Rows while each task keeps at least two row tiles (or panels cannot be split); rows are
  // split at any row, so the parts stay even (a partial tile costs about its rows).
  if (T == 1 || p.M >= 2 * row_tile(k, b) * T || P < T) return {p.M * t / T, p.M * (t + 1) / T, 0, P};
  return {0, p.M, P * t / T, P * (t + 1) / T};
}

void compute(const Kernels* k, const Problem& p, const PackedB& b, const Rect& r) {
  if (r.r1 <= r.r0 || r.p1 <= r.p0) return;
  if (b.form == Form::Dot) return k->dot(p, r.r0, r.r1, r.p0 * b.nr, std::min(p.N, r.p1 * b.nr));
  k->compute(p, b, r.r0, r.r1, r.p0, r.p1, scratch(k, p));
}

double fma_peak_gflops(const std::string& name, int64_t threads, double seconds) {
  const Kernels* k = nullptr;
  if (name == "avx512_bf16") {  // the bfloat16 ceiling: vdpbf16ps, two multiply-adds per lane
    TORCH_CHECK(cpu_has(kAvx512) && has_avx512_bf16(), "dynnet: no avx512_bf16 (vdpbf16ps) loop on this CPU (or ",
                "build): bfloat16 runs converted to float32 there, at the FMA loop's ceiling");
    k = avx512bf16_kernels();
  } else {
    const Isa isa = parse_isa(name);
    TORCH_CHECK(isa != kAten && cpu_has(isa), "dynnet: no ", name, " FMA loop on this CPU (or build); available: ",
                c10::Join(", ", available_isas()), ", and avx512_bf16 where the CPU has it");
    k = isa == kAvx512 ? avx512_kernels() : avx2_kernels();
  }
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(threads, at::get_num_threads()));
  std::vector<double> rate(T, 0.0);
  // Each thread's own CPU time: the rate of the cores themselves, unaffected by other processes
  // sharing them (a GEMM's wall-clock rate is not; the bench reports both).
  const auto cpu_seconds = [] {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
  };
  parallel_tasks(T, [&](int64_t t) {
    int64_t iters = 1 << 16;
    for (;;) {  // grow the round count until one run lasts `seconds`
      const double t0 = cpu_seconds();
      const double flops = k->fma_loop(iters);
      const double s = cpu_seconds() - t0;
      if (s >= seconds || iters > (int64_t(1) << 40)) {
        rate[t] = flops / s / 1e9;
        return;
      }
      iters *= 2;
    }
  });
  double total = 0;
  for (double r : rate) total += r;
  return total;
}

void run(const Kernels* k, const std::vector<const Problem*>& problems) {
  double flops = 0;
  for (const Problem* p : problems) flops += 2.0 * p->M * p->N * std::max<int64_t>(p->K, 1);
  const int64_t T = num_tasks(flops);
  const BPack pack(k, problems);
  const auto flops_of = [](const Problem* p) { return double(p->M) * p->N * std::max<int64_t>(p->K, 1); };
  if (T > 1 && static_cast<int64_t>(problems.size()) == T &&
      std::all_of(problems.begin(), problems.end(), [&](const Problem* p) { return flops_of(p) == flops_of(problems[0]); })) {
    // Side by side: no work shared between tasks, so no barrier and no B packed by one thread
    // and read by the other (the two operands of a layer's backward are different matrices).
    run_phases(T, {[&](int64_t t) {
      pack.run_problem(t);
      compute(k, *problems[t], pack[t], {0, problems[t]->M, 0, pack[t].panels()});
    }});
    return;
  }
  run_phases(T, {[&](int64_t t) { pack.run(t, T); },
                 [&](int64_t t) {
                   for (size_t i = 0; i < problems.size(); ++i)
                     compute(k, *problems[i], pack[i], split(k, *problems[i], pack[i], t, T));
                 }});
}

}  // namespace gemm
}  // namespace dynnet
