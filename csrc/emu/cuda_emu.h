// CPU emulation of the CUDA execution model, so the tests can run csrc/cuda/*.cu as host C++ (g++ -std=c++20
// -DFASTDIFF_CUDA_EMU) without a GPU. Test-only: never part of the installed fastdiff._C.
//
// What it models (and why each matters for finding kernel bugs):
// - one OS thread per GPU thread of a block, blocks one after another; threadIdx, blockIdx, blockDim, gridDim;
// - __syncthreads as a real barrier; a thread that returns leaves every barrier (as an exited GPU thread does);
// - __shfl_*_sync with real lane semantics through a per-warp buffer and a warp barrier (full masks only);
// - shared memory (FD_EXTERN_SHARED / FD_SHARED, see csrc/cuda/common.cuh) refilled with 0xFF bytes (a NaN for
//   float and double) when every block starts, so a read of shared memory nobody wrote in this block shows;
// - sm_90 launch limits, failing the way the driver does (the error comes back from cudaGetLastError):
//   at most 1024 threads per block (x, y ≤ 1024, z ≤ 64), grid y and z ≤ 65535; dynamic shared memory above
//   48 KiB − the kernel's static shared memory is refused unless cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
//   raised the limit, and static + dynamic never above 227 KiB;
// - streams are dummies, launches and cudaMemcpyAsync are synchronous (device-to-device = memcpy).
// A kernel's static shared size is found once by a probe: the kernel runs with zeroed arguments until it first
// asks for its index (threadIdx, blockIdx, ...) or synchronises; the FD_SHARED declarations met by then are its
// static shared memory. So static shared declarations must come first in a kernel (they do in csrc/cuda).
// Synchronisation uses std::atomic (acquire/release) and std::mutex only, so ThreadSanitizer understands it.
#pragma once

#include <math.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemcpyKind { cudaMemcpyDeviceToDevice = 3 };
using cudaStream_t = struct CUstream_st*;

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}

namespace cuda_emu {

// sm_90 limits (cudaDeviceProp of an H100/H200).
constexpr size_t kDefaultDynamicSmemLimit = 48 * 1024;   // before static shared memory is subtracted
constexpr size_t kMaxSmemPerBlock = 227 * 1024;           // sharedMemPerBlockOptin
constexpr unsigned kMaxThreads = 1024;
constexpr int kWarp = 32;

// A barrier that threads may leave for good (arrive_and_drop), as GPU threads that returned leave __syncthreads.
// One atomic word holds (expected << 32 | arrived); waiters sleep on a generation counter (futex-based
// std::atomic::wait, no mutex to fight over when hundreds of threads wake). Acquire/release order the memory
// of each phase, and ThreadSanitizer sees it through the atomics.
class Barrier {
 public:
  explicit Barrier(uint32_t count) : state_(static_cast<uint64_t>(count) << 32) {}
  template <typename OnComplete>
  void arrive_and_wait(OnComplete&& on_complete) { arrive(1, on_complete, true); }
  void arrive_and_wait() { arrive(1, [] {}, true); }
  // Arrive for this phase and leave for good: the expected count drops by one.
  void arrive_and_drop() { arrive(~uint64_t(0) << 32, [] {}, false); }

 private:
  template <typename OnComplete>
  void arrive(uint64_t add, OnComplete&& on_complete, bool wait) {
    const uint32_t gen = gen_.load(std::memory_order_acquire);
    const uint64_t s = state_.fetch_add(add, std::memory_order_acq_rel) + add;
    const uint32_t arrived = static_cast<uint32_t>(s), expected = static_cast<uint32_t>(s >> 32);
    if (arrived > 0 && arrived >= expected) {
      // Every remaining thread has arrived and waits: nobody touches state_ until gen_ moves.
      state_.store(static_cast<uint64_t>(expected) << 32, std::memory_order_relaxed);
      on_complete();
      gen_.fetch_add(1, std::memory_order_acq_rel);
      gen_.notify_all();
      return;
    }
    if (!wait) return;
    for (uint32_t g = gen; g == gen; g = gen_.load(std::memory_order_acquire)) gen_.wait(gen, std::memory_order_acquire);
  }
  std::atomic<uint64_t> state_;
  std::atomic<uint32_t> gen_{0};
};

// The state one block's threads share.
struct Block {
  dim3 idx;
  unsigned char* smem = nullptr;                    // static part [0, static_bytes), then the dynamic part
  size_t static_bytes = 0;
  std::unique_ptr<Barrier> bar;
  std::vector<std::unique_ptr<Barrier>> warp_bar;
  std::vector<uint64_t> warp_buf;                   // [warp][phase 0/1][lane]: shuffles, double-buffered
  std::atomic<int> vote[2] = {0, 0};                // __syncthreads_or, double-buffered like the shuffles
};

struct ProbeStop {};

struct Ctx {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  Block* blk = nullptr;
  int warp = 0, lane = 0, shfl_phase = 0, vote_phase = 0;
  size_t static_off = 0;                            // next FD_SHARED offset (per thread, same sequence in all)
  bool probing = false;
};
inline thread_local Ctx tls;

inline Ctx& index_ctx() {
  if (tls.probing) throw ProbeStop{};
  return tls;
}

inline size_t align16(size_t n) { return (n + 15) & ~size_t(15); }

template <typename T>
T* static_shared(size_t n) {
  Ctx& c = tls;
  const size_t off = align16(c.static_off);
  c.static_off = off + n * sizeof(T);
  if (c.probing) return nullptr;
  if (c.static_off > c.blk->static_bytes) {
    std::fprintf(stderr, "cuda_emu: a kernel declared more static shared memory than its probe found\n");
    std::abort();
  }
  return reinterpret_cast<T*>(c.blk->smem + off);
}

inline unsigned char* dynamic_shared() { return tls.probing ? nullptr : tls.blk->smem + tls.blk->static_bytes; }

inline void syncthreads() { index_ctx().blk->bar->arrive_and_wait(); }

// __syncthreads_or: a barrier that returns whether any thread passed a nonzero predicate. Votes alternate between
// two slots; the last thread to arrive clears the other slot (every thread read it before arriving here).
inline int syncthreads_or(int predicate) {
  Ctx& c = index_ctx();
  Block& b = *c.blk;
  const int ph = c.vote_phase;
  c.vote_phase ^= 1;
  if (predicate) b.vote[ph].fetch_or(1, std::memory_order_acq_rel);
  b.bar->arrive_and_wait([&] { b.vote[ph ^ 1].store(0, std::memory_order_relaxed); });
  return b.vote[ph].load(std::memory_order_acquire);
}

// One exchange among the lanes of a warp: each lane publishes v, then reads lane src's value.
template <typename T>
T shfl(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  Ctx& c = index_ctx();
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "cuda_emu: only full-warp shuffles are emulated (mask %08x)\n", mask);
    std::abort();
  }
  Block& b = *c.blk;
  // Double buffering: a lane writes phase p's slots only after every lane passed the barrier of the shuffle
  // before, which each lane reaches only after reading phase p's slots of the shuffle before that.
  uint64_t* buf = b.warp_buf.data() + (static_cast<size_t>(c.warp) * 2 + c.shfl_phase) * kWarp;
  c.shfl_phase ^= 1;
  uint64_t word = 0;
  std::memcpy(&word, &v, sizeof(T));
  buf[c.lane] = word;
  b.warp_bar[c.warp]->arrive_and_wait();
  T out;
  std::memcpy(&out, &buf[(src >= 0 && src < kWarp) ? src : c.lane], sizeof(T));
  return out;
}

// ---------------------------------------------------------------- kernels' attributes and launches
struct KernelInfo {
  bool probed = false;
  size_t static_bytes = 0;
  long max_dynamic = -1;                            // cudaFuncAttributeMaxDynamicSharedMemorySize; −1: default
};
inline std::mutex registry_mu;
inline std::map<const void*, KernelInfo> registry;
inline thread_local cudaError_t last_error = cudaSuccess;

template <typename... P>
KernelInfo& kernel_info(void (*kernel)(P...)) {
  std::lock_guard<std::mutex> lock(registry_mu);
  KernelInfo& info = registry[reinterpret_cast<const void*>(kernel)];
  if (!info.probed) {
    const Ctx saved = tls;
    tls = Ctx{};
    tls.probing = true;
    bool stopped = false;
    try {
      std::apply(kernel, std::tuple<P...>{});
    } catch (const ProbeStop&) {
      stopped = true;
    }
    info.static_bytes = align16(tls.static_off);
    tls = saved;
    if (!stopped) {
      std::fprintf(stderr, "cuda_emu: the probe ran a kernel to the end without it asking for its index\n");
      std::abort();
    }
    info.probed = true;
  }
  return info;
}

inline cudaError_t check_config(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > kMaxThreads)
    return cudaErrorInvalidConfiguration;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  return cudaSuccess;
}

template <typename... P>
cudaError_t run(void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_bytes, const std::tuple<P...>& args) {
  if (const cudaError_t e = check_config(grid, block); e != cudaSuccess) return e;
  size_t static_bytes;
  long max_dynamic;
  {
    KernelInfo& info = kernel_info(kernel);
    std::lock_guard<std::mutex> lock(registry_mu);
    static_bytes = info.static_bytes;
    max_dynamic = info.max_dynamic;
  }
  const size_t limit = max_dynamic >= 0 ? static_cast<size_t>(max_dynamic)
                                         : (kDefaultDynamicSmemLimit > static_bytes ? kDefaultDynamicSmemLimit - static_bytes : 0);
  if (dynamic_bytes > limit || static_bytes + dynamic_bytes > kMaxSmemPerBlock) return cudaErrorInvalidValue;

  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  const int nwarps = (nthreads + kWarp - 1) / kWarp;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<unsigned char> smem(static_bytes + dynamic_bytes + 16);
  Block blk;
  blk.smem = smem.data();
  blk.static_bytes = static_bytes;
  blk.warp_bar.resize(nwarps);
  blk.warp_buf.assign(static_cast<size_t>(nwarps) * 2 * kWarp, 0);
  uint64_t next = 0;
  bool done = false;
  // Runs once, on the last thread to arrive, while every other thread waits: set up the next block.
  auto next_block = [&] {
    if (next == nblocks) {
      done = true;
      return;
    }
    blk.idx = dim3(static_cast<unsigned>(next % grid.x), static_cast<unsigned>((next / grid.x) % grid.y),
                   static_cast<unsigned>(next / (uint64_t(grid.x) * grid.y)));
    ++next;
    std::memset(blk.smem, 0xFF, smem.size());        // NaN in every float and double slot
    blk.vote[0].store(0, std::memory_order_relaxed);
    blk.vote[1].store(0, std::memory_order_relaxed);
    blk.bar = std::make_unique<Barrier>(static_cast<uint32_t>(nthreads));
    for (int w = 0; w < nwarps; ++w) blk.warp_bar[w] = std::make_unique<Barrier>(static_cast<uint32_t>(std::min(kWarp, nthreads - w * kWarp)));
  };
  Barrier gate(static_cast<uint32_t>(nthreads));
  auto worker = [&](int t) {
    for (;;) {
      gate.arrive_and_wait(next_block);
      if (done) return;
      Ctx& c = tls;
      c = Ctx{};
      c.thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      c.block_idx = blk.idx;
      c.block_dim = block;
      c.grid_dim = grid;
      c.blk = &blk;
      c.warp = t / kWarp;
      c.lane = t % kWarp;
      std::apply(kernel, args);
      blk.bar->arrive_and_drop();
      blk.warp_bar[c.warp]->arrive_and_drop();
      c = Ctx{};
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(nthreads);
  for (int t = 0; t < nthreads; ++t) threads.emplace_back(worker, t);
  for (auto& th : threads) th.join();
  return cudaSuccess;
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t dynamic_bytes;
  template <typename... A>
  void operator()(A&&... a) const {
    const std::tuple<P...> args(std::forward<A>(a)...);   // the kernel's parameters, by value as on a GPU
    const cudaError_t e = run(kernel, grid, block, dynamic_bytes, args);
    if (e != cudaSuccess) last_error = e;
  }
};

template <typename... P>
Launch<P...> launch(dim3 grid, dim3 block, size_t dynamic_bytes, cudaStream_t, void (*kernel)(P...)) {
  return Launch<P...>{kernel, grid, block, dynamic_bytes};
}

}  // namespace cuda_emu

// ---------------------------------------------------------------- the CUDA names the kernels use
#define threadIdx (::cuda_emu::index_ctx().thread_idx)
#define blockIdx (::cuda_emu::index_ctx().block_idx)
#define blockDim (::cuda_emu::index_ctx().block_dim)
#define gridDim (::cuda_emu::index_ctx().grid_dim)

#define FD_LAUNCH(grid, block, shmem, stream, ...) ::cuda_emu::launch(grid, block, shmem, stream, __VA_ARGS__)
#define FD_EXTERN_SHARED(T, name) T* const name = reinterpret_cast<T*>(::cuda_emu::dynamic_shared())
#define FD_SHARED(T, name, n) T* const name = ::cuda_emu::static_shared<T>(n)

inline void __syncthreads() { ::cuda_emu::syncthreads(); }
inline int __syncthreads_or(int predicate) { return ::cuda_emu::syncthreads_or(predicate); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = ::cuda_emu::index_ctx().lane;
  return ::cuda_emu::shfl(mask, v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::cuda_emu::index_ctx().lane;
  const int src = lane ^ lane_mask;
  return ::cuda_emu::shfl(mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::cuda_emu::index_ctx().lane;
  const int src = lane + static_cast<int>(delta);
  return ::cuda_emu::shfl(mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::cuda_emu::index_ctx().lane;
  const int src = lane - static_cast<int>(delta);
  return ::cuda_emu::shfl(mask, v, src >= (lane & ~(width - 1)) ? src : lane);
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::cuda_emu::last_error;
  ::cuda_emu::last_error = cudaSuccess;
  return e;
}

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  ::cuda_emu::KernelInfo& info = ::cuda_emu::kernel_info(kernel);
  std::lock_guard<std::mutex> lock(::cuda_emu::registry_mu);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      info.static_bytes + static_cast<size_t>(value) > ::cuda_emu::kMaxSmemPerBlock)
    return cudaErrorInvalidValue;
  info.max_dynamic = value;
  return cudaSuccess;
}

inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

// ---------------------------------------------------------------- device math on the host
// min/max as CUDA's: fminf/fmaxf semantics for floating types (a NaN operand loses).
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline T max(T a, T b) { return a < b ? b : a; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

namespace cuda_emu {
// sin(πx), cos(πx) as CUDA's sincospi: exact reduction x = n/2 + r with |r| ≤ 1/4, then πr in long double,
// so results near the zeros keep full relative accuracy (as the device functions do, to an ulp or two).
template <typename F>
inline void sincospi_host(F x, F* s, F* c) {
  if (!std::isfinite(x)) {
    *s = *c = std::numeric_limits<F>::quiet_NaN();
    return;
  }
  const F n = std::nearbyint(x * F(2));
  const F r = x - n / F(2);
  const long double a = 3.141592653589793238462643383279502884L * static_cast<long double>(r);
  const long double sa = sinl(a), ca = cosl(a);
  F q = std::fmod(n, F(4));
  if (q < 0) q += 4;
  switch (static_cast<int>(q)) {
    case 0: *s = static_cast<F>(sa); *c = static_cast<F>(ca); break;
    case 1: *s = static_cast<F>(ca); *c = static_cast<F>(-sa); break;
    case 2: *s = static_cast<F>(-sa); *c = static_cast<F>(-ca); break;
    default: *s = static_cast<F>(-ca); *c = static_cast<F>(sa); break;
  }
}
}  // namespace cuda_emu

inline void sincospif(float x, float* s, float* c) { ::cuda_emu::sincospi_host(x, s, c); }
inline void sincospi(double x, double* s, double* c) { ::cuda_emu::sincospi_host(x, s, c); }
// sincos, sincosf, exp, expf, log, logf, sqrt, sqrtf, fmin, fmax, INFINITY: the C library's (<math.h>).
