// The CUDA harness's execution engine (see shim.h for the model and what it checks).
//
// Why fibers on one host thread, not a std::thread per CUDA thread: a block barrier is the
// hot operation (the 64 x 64 GEMM tile opens two per 32-wide reduction slice). Measured here
// (2-core EPYC, 256 threads, a barrier-bound loop): std::thread + std::barrier ~590 us per
// barrier, ucontext fibers (swapcontext, two syscalls a switch) ~125 us, the hand-written switch
// below ~7.5 us. Fibers also make the checks exact and the runs reproducible: the scheduler knows
// where every thread waits at every moment, and the schedule order is chosen, not left to the OS.
//
// The switch saves what the x86-64 SysV ABI makes callee-saved (rbx, rbp, r12-r15, MXCSR, the
// x87 control word) and swaps stack pointers; elsewhere ucontext is the fallback. Under
// AddressSanitizer every switch is announced (__sanitizer_start/finish_switch_fiber).

#include "shim.h"

#include <c10/util/Exception.h>
#include <link.h>
#include <sys/mman.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define DYNNET_ASAN 1
#else
#define DYNNET_ASAN 0
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace dynnet::harness {
namespace {

// ---- context switch -------------------------------------------------------------------------

#if defined(__x86_64__)
extern "C" void dynnet_harness_switch(void** save_sp, void* next_sp);
asm(R"(
  .text
  .globl dynnet_harness_switch
  .hidden dynnet_harness_switch
  .type dynnet_harness_switch, @function
dynnet_harness_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size dynnet_harness_switch, .-dynnet_harness_switch
)");

struct Context {
  void* sp = nullptr;
};

// A fresh context on [lo, lo + size) that starts in entry() (which never returns).
void make_context(Context& c, char* lo, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(lo + size) & ~uintptr_t(15);
  auto* s = reinterpret_cast<uint64_t*>(top);
  *--s = 0;                                     // entry's return address: none (keeps rsp % 16 == 8 at entry)
  *--s = reinterpret_cast<uint64_t>(entry);     // where the first switch's `ret` goes
  for (int i = 0; i < 6; ++i) *--s = 0;         // rbp, rbx, r12-r15
  *--s = (uint64_t{0x037F} << 32) | 0x1F80;     // MXCSR and x87 control word at their defaults
  c.sp = s;
}

void switch_context(Context& from, Context& to) { dynnet_harness_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void make_context(Context& c, char* lo, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = lo;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---- state ----------------------------------------------------------------------------------
// Plain globals, not thread_local: the runner thread's thread-local storage is the blocks'
// shared memory and is overwritten before every block (shim.h).

constexpr size_t kStackBytes = 512 * 1024;  // room for ASan's larger frames too
constexpr size_t kGuardBytes = 4096;

enum class State { Ready, AtBarrier, AtWarp, Done, Failed };

struct Fiber {
  unsigned id = 0;        // linear thread index in the block
  char* stack = nullptr;  // lowest usable byte (a guard page lies below)
  Context ctx;
  uint3 idx{};
  State state = State::Ready;
  const char* file = nullptr;  // where it waits
  int line = 0;
  WarpOp op = WarpOp::Sync;  // the warp operation it waits at, and its operands and result
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
  std::string error;
  void* fake_stack = nullptr;  // ASan's bookkeeping across switches
};

struct Launch {
  const char* name;
  dim3 grid, block;
  size_t smem_bytes;
  const std::function<void()>* body;
};

std::vector<std::unique_ptr<Fiber>> fibers;
Fiber* current = nullptr;
Context scheduler;
const void* scheduler_stack = nullptr;  // for ASan
size_t scheduler_stack_size = 0;
void* scheduler_fake_stack = nullptr;
uint3 current_block{};
dim3 current_grid, current_block_dim;
std::vector<unsigned char> dynamic_smem_buffer;  // sized per launch: exactly what was asked for
unsigned char* dynamic_smem_ptr = nullptr;
const Launch* current_launch = nullptr;
Schedule schedule_order = Schedule::Forward;
bool abandoned_frames = false;  // a failed block left fibers mid-kernel (ASan: their stacks stay poisoned)

std::mutex stats_mutex;
std::map<std::string, KernelStats> stats;
std::mutex attributes_mutex;
std::map<const void*, size_t> max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize

void start_switch(void** fake_stack_save, const void* bottom, size_t size) {
#if DYNNET_ASAN
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#else
  (void)fake_stack_save, (void)bottom, (void)size;
#endif
}

void finish_switch(void* fake_stack_save, const void** old_bottom, size_t* old_size) {
#if DYNNET_ASAN
  __sanitizer_finish_switch_fiber(fake_stack_save, old_bottom, old_size);
#else
  (void)fake_stack_save, (void)old_bottom, (void)old_size;
#endif
}

// From the running fiber back to the scheduler; `final` when the fiber will never resume.
void yield_to_scheduler(bool final) {
  Fiber* f = current;
  start_switch(final ? nullptr : &f->fake_stack, scheduler_stack, scheduler_stack_size);
  switch_context(f->ctx, scheduler);
  finish_switch(f->fake_stack, nullptr, nullptr);
}

void fiber_main() {
  finish_switch(nullptr, &scheduler_stack, &scheduler_stack_size);
  Fiber* f = current;
  try {
    (*current_launch->body)();
    f->state = State::Done;
  } catch (const std::exception& e) {
    f->error = e.what();
    f->state = State::Failed;
  } catch (...) {
    f->error = "an exception that is not a std::exception";
    f->state = State::Failed;
  }
  yield_to_scheduler(/*final=*/true);
  __builtin_unreachable();
}

Fiber& fiber(size_t t) {
  while (fibers.size() <= t) {
    auto f = std::make_unique<Fiber>();
    void* mem = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(mem != MAP_FAILED, "CUDA harness: cannot map a fiber stack");
    mprotect(mem, kGuardBytes, PROT_NONE);  // a stack overflow faults instead of corrupting
    f->stack = static_cast<char*>(mem) + kGuardBytes;
    f->id = static_cast<unsigned>(fibers.size());
    fibers.push_back(std::move(f));
  }
  return *fibers[t];
}

void resume(Fiber& f) {
  current = &f;
  start_switch(&scheduler_fake_stack, f.stack, kStackBytes);
  switch_context(scheduler, f.ctx);
  finish_switch(scheduler_fake_stack, nullptr, nullptr);
  current = nullptr;
}

// ---- shared memory --------------------------------------------------------------------------

struct TlsBlock {
  void* data = nullptr;
  size_t size = 0;
};

thread_local char tls_anchor;  // touched so that this thread's copy of our TLS exists

int find_tls(dl_phdr_info* info, size_t, void* out) {
  const auto self = reinterpret_cast<uintptr_t>(&fiber_main);
  bool mine = false;
  const ElfW(Phdr)* tls = nullptr;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    if (ph.p_type == PT_LOAD && self >= lo && self < lo + ph.p_memsz) mine = true;
    if (ph.p_type == PT_TLS) tls = &ph;
  }
  if (!mine) return 0;
  auto* block = static_cast<TlsBlock*>(out);
  if (tls != nullptr) block->data = info->dlpi_tls_data, block->size = tls->p_memsz;
  return 1;
}

// This thread's copy of the library's thread-local storage: every __shared__ variable.
TlsBlock shared_variables() {
  char* anchor = &tls_anchor;           // the first use allocates this thread's copy
  asm volatile("" : : "r"(anchor) : "memory");
  *anchor = 1;
  TlsBlock block;
  dl_iterate_phdr(find_tls, &block);
  TORCH_CHECK(block.data != nullptr, "CUDA harness: cannot find this library's thread-local storage");
  return block;
}

// All bits set: NaN in every floating type.
void fill_nan(void* p, size_t n) { std::memset(p, 0xFF, n); }

// ---- the scheduler --------------------------------------------------------------------------

std::string describe_threads(const std::vector<unsigned>& ts) {
  std::ostringstream out;
  for (size_t i = 0; i < ts.size();) {
    size_t j = i;
    while (j + 1 < ts.size() && ts[j + 1] == ts[j] + 1) ++j;
    out << (i ? ", " : "") << ts[i];
    if (j > i) out << "-" << ts[j];
    i = j + 1;
  }
  return out.str();
}

std::string where(const Launch& l, uint3 b) {
  std::ostringstream out;
  out << "kernel " << l.name << ", block (" << b.x << "," << b.y << "," << b.z << ")";
  return out.str();
}

const char* basename(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

bool same_site(const Fiber& a, const Fiber& b) {
  return a.line == b.line && (a.file == b.file || !std::strcmp(a.file, b.file));
}

std::string site(const Fiber& f) { return std::string(basename(f.file)) + ":" + std::to_string(f.line); }

// Completes every warp operation whose lanes have all arrived; returns how many threads it released.
// n: threads in the block. Throws where a lane of a mask can never arrive.
int release_warps(const Launch& l, uint3 b, unsigned n) {
  int released = 0;
  for (unsigned w = 0; w * 32 < n; ++w) {
    const unsigned lanes = std::min(32u, n - w * 32);
    Fiber* lane[32];
    for (unsigned j = 0; j < lanes; ++j) lane[j] = fibers[w * 32 + j].get();
    for (unsigned i = 0; i < lanes; ++i) {
      const Fiber& f = *lane[i];
      if (f.state != State::AtWarp) continue;
      const auto fail = [&](const std::string& why) {
        abandoned_frames = true;
        throw std::runtime_error(where(l, b) + ", warp " + std::to_string(w) + ": lane " + std::to_string(i) + " at " +
                                 site(f) + " " + why);
      };
      if (!(f.mask >> i & 1)) fail("is not in its own mask");
      if (f.width < 1 || f.width > 32 || (f.width & (f.width - 1))) fail("uses a width that is not 1, 2, 4, .., 32");
      for (unsigned j = 0; j < 32; ++j) {
        if (!(f.mask >> j & 1)) continue;
        if (j >= lanes) fail("names lane " + std::to_string(j) + " in its mask, which the block does not have");
        const Fiber& g = *lane[j];
        if (g.state == State::Done) fail("waits for lane " + std::to_string(j) + ", which has returned");
        if (g.state == State::AtBarrier) fail("waits for lane " + std::to_string(j) + ", which waits at __syncthreads() at " + site(g));
        if (!same_site(f, g) || g.op != f.op || g.mask != f.mask) {
          fail("waits for lane " + std::to_string(j) + ", which waits at another warp operation (" + site(g) + ")");
        }
      }
      uint64_t votes = 0;
      for (unsigned j = 0; j < 32; ++j) {
        if (f.mask >> j & 1 && lane[j]->value != 0) votes |= uint64_t{1} << j;
      }
      for (unsigned j = 0; j < 32; ++j) {
        if (!(f.mask >> j & 1)) continue;
        Fiber& g = *lane[j];
        const int width = g.width, seg = static_cast<int>(j) / width * width, me = static_cast<int>(j);
        int src = me;
        switch (g.op) {
          case WarpOp::Index: src = seg + ((g.arg % width) + width) % width; break;
          case WarpOp::Up: src = me - g.arg < seg ? me : me - g.arg; break;
          case WarpOp::Down: src = me + g.arg >= seg + width ? me : me + g.arg; break;
          case WarpOp::Xor: src = (me ^ g.arg) >= seg + width || (me ^ g.arg) < seg ? me : me ^ g.arg; break;
          default: break;
        }
        if (!(f.mask >> src & 1)) {
          fail("has lane " + std::to_string(j) + " read lane " + std::to_string(src) +
               ", which is not in the mask (its value is undefined on the GPU)");
        }
        switch (g.op) {
          case WarpOp::Ballot: g.result = votes; break;
          case WarpOp::Any: g.result = votes != 0; break;
          case WarpOp::All: g.result = votes == f.mask; break;
          case WarpOp::Sync: g.result = 0; break;
          default: g.result = lane[src]->value;
        }
      }
      for (unsigned j = 0; j < 32; ++j) {
        if (f.mask >> j & 1) lane[j]->state = State::Ready, ++released;
      }
    }
  }
  return released;
}

// Runs one block to its end; returns its barrier count, or throws std::runtime_error.
int64_t run_block(const Launch& l, uint3 b, const TlsBlock& shared) {
  fill_nan(shared.data, shared.size);
  if (l.smem_bytes) fill_nan(dynamic_smem_ptr, l.smem_bytes);
  current_block = b;
  const unsigned n = l.block.x * l.block.y * l.block.z;
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = fiber(t);
#if DYNNET_ASAN
    if (abandoned_frames) __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
    make_context(f.ctx, f.stack, kStackBytes, fiber_main);
    f.idx = {t % l.block.x, t / l.block.x % l.block.y, t / (l.block.x * l.block.y)};
    f.state = State::Ready;
    f.error.clear();
    f.fake_stack = nullptr;
  }
  abandoned_frames = false;
  int64_t barriers = 0;
  for (;;) {
    for (unsigned i = 0; i < n; ++i) {
      Fiber& f = *fibers[schedule_order == Schedule::Forward ? i : n - 1 - i];
      if (f.state != State::Ready) continue;
      resume(f);
      if (f.state == State::Failed) {
        abandoned_frames = true;
        throw std::runtime_error(where(l, b) + ", thread " + std::to_string(f.id) + ": " + f.error);
      }
    }
    if (release_warps(l, b, n) > 0) continue;
    // Every thread now waits at a barrier or has returned: at one barrier, or it is an error.
    const Fiber* first = nullptr;
    bool one_site = true;
    for (unsigned t = 0; t < n; ++t) {
      const Fiber& f = *fibers[t];
      if (f.state != State::AtBarrier) continue;
      if (first == nullptr) first = &f;
      one_site = one_site && same_site(f, *first);
    }
    if (first == nullptr) return barriers;
    if (!one_site) {
      abandoned_frames = true;
      std::map<std::pair<std::string, int>, std::vector<unsigned>> sites;
      std::vector<unsigned> returned;
      for (unsigned t = 0; t < n; ++t) {
        if (fibers[t]->state == State::AtBarrier) sites[{fibers[t]->file, fibers[t]->line}].push_back(t);
        if (fibers[t]->state == State::Done) returned.push_back(t);
      }
      std::ostringstream out;
      out << where(l, b) << ": threads wait at different __syncthreads() in one phase (a barrier in divergent "
          << "code deadlocks or misbehaves on the GPU):";
      for (const auto& [site, ts] : sites) {
        out << " threads " << describe_threads(ts) << " at " << basename(site.first.c_str()) << ":" << site.second
            << ";";
      }
      if (!returned.empty()) out << " threads " << describe_threads(returned) << " returned;";
      throw std::runtime_error(out.str());
    }
    ++barriers;
    for (unsigned t = 0; t < n; ++t) {
      if (fibers[t]->state == State::AtBarrier) fibers[t]->state = State::Ready;
    }
  }
}

void run_launch(const Launch& l) {
  static const TlsBlock shared = shared_variables();  // the runner thread's copy
  current_launch = &l;
  current_grid = l.grid;
  current_block_dim = l.block;
  dynamic_smem_buffer.assign(l.smem_bytes, 0);
  dynamic_smem_buffer.shrink_to_fit();  // exactly the size asked for: ASan sees any overflow
  dynamic_smem_ptr = dynamic_smem_buffer.data();
  const int64_t blocks = int64_t{l.grid.x} * l.grid.y * l.grid.z;
  int64_t barriers = 0;
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t k = schedule_order == Schedule::Forward ? i : blocks - 1 - i;
    const uint3 b{static_cast<unsigned>(k % l.grid.x), static_cast<unsigned>(k / l.grid.x % l.grid.y),
                  static_cast<unsigned>(k / (int64_t{l.grid.x} * l.grid.y))};
    barriers += run_block(l, b, shared);
  }
  const std::lock_guard<std::mutex> lock(stats_mutex);
  KernelStats& s = stats[l.name];
  s.launches += 1;
  s.blocks += blocks;
  s.threads += blocks * l.block.x * l.block.y * l.block.z;
  s.barriers += barriers;
}

// ---- the runner thread ----------------------------------------------------------------------

class Runner {
 public:
  // Runs l on the runner thread; returns the error message, empty if none.
  std::string run(const Launch& l) {
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = &l;
    error_.clear();
    done_ = false;
    wake_.notify_one();
    finished_.wait(lock, [this] { return done_; });
    return error_;
  }

  static Runner& get() {
    static Runner* runner = new Runner();  // never destroyed: the thread may outlive static destructors
    return *runner;
  }

 private:
  Runner() : thread_([this] { loop(); }) { thread_.detach(); }

  void loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return job_ != nullptr; });
      const Launch* l = job_;
      lock.unlock();
      std::string error;
      try {
        run_launch(*l);
      } catch (const std::exception& e) {
        error = e.what();
      }
      lock.lock();
      job_ = nullptr;
      error_ = std::move(error);
      done_ = true;
      finished_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, finished_;
  const Launch* job_ = nullptr;
  std::string error_;
  bool done_ = false;
  std::thread thread_;
};

std::mutex launch_mutex;  // one launch at a time, as on one stream

std::string dims(dim3 d) {
  std::ostringstream out;
  out << "(" << d.x << "," << d.y << "," << d.z << ")";
  return out.str();
}

}  // namespace

// ---- the built-ins --------------------------------------------------------------------------

int planted_bug = 0;

const uint3& thread_idx() { return current->idx; }
const uint3& block_idx() { return current_block; }
const dim3& block_dim() { return current_block_dim; }
const dim3& grid_dim() { return current_grid; }
unsigned char* dynamic_smem_bytes() { return dynamic_smem_ptr; }

uint64_t warp_op(const char* file, int line, WarpOp op, unsigned mask, uint64_t value, int arg, int width) {
  TORCH_CHECK(current != nullptr, "CUDA harness: a warp operation called outside a kernel (", file, ":", line, ")");
  Fiber* f = current;
  f->state = State::AtWarp;
  f->file = file, f->line = line;
  f->op = op, f->mask = mask, f->value = value, f->arg = arg, f->width = width;
  yield_to_scheduler(/*final=*/false);
  return f->result;
}

void sync_block(const char* file, int line) {
  TORCH_CHECK(current != nullptr, "CUDA harness: __syncthreads() called outside a kernel (", file, ":", line, ")");
  current->state = State::AtBarrier;
  current->file = file;
  current->line = line;
  yield_to_scheduler(/*final=*/false);
}

std::string kernel_name_from_signature(std::string_view pretty) {
  const std::string_view key = "kKernel = ";
  size_t begin = pretty.find(key);
  if (begin == std::string_view::npos) return std::string(pretty);
  begin += key.size();
  if (pretty[begin] == '&') ++begin;
  size_t end = begin;
  for (int depth = 0; end < pretty.size(); ++end) {
    const char c = pretty[end];
    if (c == '<' || c == '(') ++depth;
    if (c == '>' || c == ')') --depth;
    if (depth == 0 && (c == ';' || c == ']')) break;
  }
  return std::string(pretty.substr(begin, end - begin));
}

void set_max_dynamic_smem_bytes(const char* name, const void* kernel, size_t bytes) {
  TORCH_CHECK(bytes <= 227 * 1024, "CUDA harness: cudaFuncSetAttribute(", name,
              ", MaxDynamicSharedMemorySize, ", bytes, "): invalid argument, sm_90 allows at most 227 KiB");
  const std::lock_guard<std::mutex> lock(attributes_mutex);
  max_dynamic_smem[kernel] = bytes;
}

void run_kernel(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem_bytes,
                const std::function<void()>& body) {
  const auto config = [&] {
    return std::string(name) + "<<<" + dims(grid) + ", " + dims(block) + ", " + std::to_string(smem_bytes) + ">>>";
  };
  TORCH_CHECK(block.x >= 1 && block.y >= 1 && block.z >= 1 && block.x <= 1024 && block.y <= 1024 && block.z <= 64 &&
                  uint64_t{block.x} * block.y * block.z <= 1024,
              "CUDA harness: invalid configuration argument in ", config(),
              ": a block has 1 to 1024 threads, x and y at most 1024, z at most 64");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535 &&
                  grid.z <= 65535,
              "CUDA harness: invalid configuration argument in ", config(),
              ": a grid has x from 1 to 2^31 - 1, y and z from 1 to 65535");
  size_t allowed = 48 * 1024;
  {
    const std::lock_guard<std::mutex> lock(attributes_mutex);
    const auto it = max_dynamic_smem.find(kernel);
    if (it != max_dynamic_smem.end()) allowed = std::max(allowed, it->second);
  }
  TORCH_CHECK(smem_bytes <= allowed, "CUDA harness: ", config(), " asks for ", smem_bytes,
              " bytes of dynamic shared memory, but the kernel allows ", allowed,
              " (above 48 KiB a kernel must opt in with cudaFuncSetAttribute first: allow_dynamic_smem)");
  const std::lock_guard<std::mutex> lock(launch_mutex);
  const Launch l{name, grid, block, smem_bytes, &body};
  const std::string error = Runner::get().run(l);
  TORCH_CHECK(error.empty(), "CUDA harness: ", error);
}

void set_schedule(Schedule order) {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  schedule_order = order;
}

std::vector<std::pair<std::string, KernelStats>> kernel_stats() {
  const std::lock_guard<std::mutex> lock(stats_mutex);
  return {stats.begin(), stats.end()};
}

void reset_kernel_stats() {
  const std::lock_guard<std::mutex> lock(stats_mutex);
  stats.clear();
}

}  // namespace dynnet::harness
