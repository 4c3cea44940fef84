// CUDA for the host compiler: what the project's kernels use of CUDA, so that the same kernel
// source (csrc/cuda/*.cuh) compiles with g++ and runs on the CPU, in the tests' CUDA harness.
// Included through ../runtime.cuh when DYNNET_CUDA_HARNESS is defined; never part of the wheel.
//
// Execution model (shim.cpp): a launch runs on one host thread, the harness's runner thread,
// block after block; inside a block every CUDA thread is a fiber (its own stack, switched by a
// few instructions), and the fibers run one at a time, each until it reaches __syncthreads() or
// a warp operation, or returns. A warp operation completes when every lane of its mask has
// reached it; when every thread still running waits at the same __syncthreads(), the barrier
// opens. This is a legal schedule of the CUDA program, so a kernel that is correct on the GPU
// gives the same result here - up to floating-point contraction: the host compiler does not
// fuse a * b + c into one FMA where nvcc does, so the last bits may differ. Code that counts on
// the lanes of a warp running in lock-step without __syncwarp() fails here, as it may on Volta
// and later GPUs.
//
// What the shim checks and reports as an error naming the kernel, the block and the source line:
//   - threads of a block waiting at different __syncthreads() call sites (a barrier in divergent
//     code, a missing or extra barrier on some path); a thread that returns leaves the barrier,
//     as on the GPU (sm_70 and later);
//   - a warp operation whose mask names a lane that returned, waits at __syncthreads() or at
//     another warp operation, or a shuffle that reads a lane outside its mask;
//   - launch limits of sm_90: at most 1024 threads a block (x, y <= 1024, z <= 64), grid x up
//     to 2^31 - 1, y and z up to 65535, no empty grid or block; dynamic shared memory above 48
//     KiB only after allow_dynamic_smem<kernel>() (cudaFuncSetAttribute), and never above 227 KiB.
// What it makes loud rather than silent:
//   - __shared__ variables and dynamic shared memory are filled with NaN (all bits set) before
//     every block: a read of shared memory that no thread of the block wrote gives NaN;
//   - ../runtime.cuh's new_output() fills outputs with NaN: an element no thread writes shows;
//   - the schedule order (threads within a phase, blocks within a grid) can be reversed
//     (set_schedule): a race between threads of a block, or between blocks, then changes the
//     result, which the tests' bitwise repeat comparisons catch.
// The sanitizer build (AddressSanitizer + UBSan) adds bounds checks: global and dynamic shared
// memory by ASan (each a heap block of its exact size), __shared__ arrays by UBSan's bounds checks.
//
// How __shared__ works here: `__shared__` becomes `static thread_local`. Only the runner thread
// runs kernels, and it runs nothing else, so its copy of this library's thread-local storage is
// the shared memory of the block it runs; the shim fills that whole copy with NaN before each
// block. Consequence: device code must not use thread_local (or rely on static variables keeping
// values across blocks) for anything else - neither may CUDA.
//
// What kernels can use: threadIdx, blockIdx, blockDim, gridDim, warpSize, __shared__, dynamic
// shared memory (runtime.cuh's dynamic_smem<T>()), __syncthreads(), __syncwarp(), __shfl_sync and
// its up / down / xor forms, __ballot_sync, __any_sync, __all_sync (the lanes of the mask must all
// reach the same call: a warp operation is a barrier of those lanes), __ldg, the vector types
// float2/float4/double2/int4, __launch_bounds__ (ignored), #pragma unroll (ignored).
// To support a new built-in, add it here with its host meaning (and, if it synchronises threads,
// to the scheduler in shim.cpp), and a kernel that uses it to tests/test_cuda_harness.py.
#pragma once

#include <ATen/Dispatch.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Vector types for wide loads, with CUDA's alignment (a misaligned reinterpret_cast shows in UBSan).
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __syncthreads() ::dynnet::harness::sync_block(__FILE__, __LINE__)
// Warp-level operations: the lanes named in the mask must all reach the same call; see warp_op.
#define __syncwarp(...) ::dynnet::harness::sync_warp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::dynnet::harness::shuffle(__FILE__, __LINE__, ::dynnet::harness::WarpOp::Index, __VA_ARGS__)
#define __shfl_up_sync(...) ::dynnet::harness::shuffle(__FILE__, __LINE__, ::dynnet::harness::WarpOp::Up, __VA_ARGS__)
#define __shfl_down_sync(...) \
  ::dynnet::harness::shuffle(__FILE__, __LINE__, ::dynnet::harness::WarpOp::Down, __VA_ARGS__)
#define __shfl_xor_sync(...) ::dynnet::harness::shuffle(__FILE__, __LINE__, ::dynnet::harness::WarpOp::Xor, __VA_ARGS__)
#define __ballot_sync(mask, pred) ::dynnet::harness::vote(__FILE__, __LINE__, ::dynnet::harness::WarpOp::Ballot, mask, pred)
#define __any_sync(mask, pred) (::dynnet::harness::vote(__FILE__, __LINE__, ::dynnet::harness::WarpOp::Any, mask, pred) != 0)
#define __all_sync(mask, pred) (::dynnet::harness::vote(__FILE__, __LINE__, ::dynnet::harness::WarpOp::All, mask, pred) != 0)
#define threadIdx (::dynnet::harness::thread_idx())
#define blockIdx (::dynnet::harness::block_idx())
#define blockDim (::dynnet::harness::block_dim())
#define gridDim (::dynnet::harness::grid_dim())

constexpr int warpSize = 32;

// The planted-bug build (tests/cuda_harness.py) compiles a generated copy of the kernels in which
// each planted bug sits behind DYNNET_PLANTED(id), on when set_planted_bug(id) was called; and it
// compiles them for float32 only, the dtype of the probe it runs (a quarter of the instantiations).
#define DYNNET_PLANTED(id) (::dynnet::harness::planted_bug == (id))
#ifdef DYNNET_HARNESS_FLOAT32_ONLY
#undef AT_DISPATCH_FLOATING_TYPES_AND2
#define AT_DISPATCH_FLOATING_TYPES_AND2(T1, T2, TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__))
#endif

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

namespace dynnet::harness {

// The running thread's built-ins (valid inside a kernel only).
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void sync_block(const char* file, int line);
unsigned char* dynamic_smem_bytes();

// One warp-level operation of the running thread: it waits until every lane of `mask` (bit i:
// lane i of its warp) has reached the same call, then each gets its result - for a shuffle the
// 8-byte value of the lane it reads (its own where that lane lies outside its `width`-lane
// segment), for a vote the mask of lanes whose value is nonzero. A lane of the mask that has
// returned, waits at __syncthreads() or at another warp call is an error, as is reading a lane
// outside the mask.
enum class WarpOp { Sync, Index, Up, Down, Xor, Ballot, Any, All };
uint64_t warp_op(const char* file, int line, WarpOp op, unsigned mask, uint64_t value, int arg, int width);

inline void sync_warp(const char* file, int line, unsigned mask = 0xFFFFFFFFu) {
  warp_op(file, line, WarpOp::Sync, mask, 0, 0, 32);
}

template <typename T>
inline T shuffle(const char* file, int line, WarpOp op, unsigned mask, T value, int arg, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "a shuffle moves up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_op(file, line, op, mask, bits, arg, width);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

inline unsigned vote(const char* file, int line, WarpOp op, unsigned mask, int predicate) {
  return static_cast<unsigned>(warp_op(file, line, op, mask, predicate != 0, 0, 32));
}

template <typename T>
inline T* dynamic_smem() {
  return reinterpret_cast<T*>(dynamic_smem_bytes());
}

// One launch: checks the configuration, then runs every block (body runs one thread's kernel
// call). Errors throw c10::Error on the calling thread.
void run_kernel(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem_bytes,
                const std::function<void()>& body);
void set_max_dynamic_smem_bytes(const char* name, const void* kernel, size_t bytes);

// "dynnet::gemm_kernel<float, dynnet::Role::Forward, true, true>" from this function's signature.
std::string kernel_name_from_signature(std::string_view pretty_function);

template <auto kKernel>
const char* kernel_name() {
  static const std::string name = kernel_name_from_signature(__PRETTY_FUNCTION__);
  return name.c_str();
}

template <typename F>
struct KernelParams;
template <typename... P>
struct KernelParams<void (*)(P...)> {
  using type = std::tuple<std::decay_t<P>...>;
};

template <auto kKernel>
const void* kernel_key() {
  return reinterpret_cast<const void*>(kKernel);
}

// kernel<<<grid, block, smem_bytes>>>(args...): the arguments are converted to the kernel's
// parameter types once, as a CUDA launch copies them, and every thread gets its own copy.
template <auto kKernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  const typename KernelParams<decltype(kKernel)>::type params(std::forward<Args>(args)...);
  run_kernel(kernel_name<kKernel>(), kernel_key<kKernel>(), grid, block, smem_bytes,
             [&params] { std::apply(kKernel, params); });
}

template <auto kKernel>
void set_max_dynamic_smem(size_t bytes) {
  set_max_dynamic_smem_bytes(kernel_name<kKernel>(), kernel_key<kKernel>(), bytes);
}

extern int planted_bug;  // 0: none

// For the harness module (module.cpp): the schedule order, and what ran.
enum class Schedule { Forward, Reverse };
void set_schedule(Schedule order);

struct KernelStats {
  int64_t launches = 0, blocks = 0, threads = 0, barriers = 0;  // barriers: opened, summed over blocks
};
std::vector<std::pair<std::string, KernelStats>> kernel_stats();
void reset_kernel_stats();

}  // namespace dynnet::harness
