// simt.h: a small, strict SIMT emulator, so the project's CUDA kernels compile as C++ and run on a CPU.
//
// Each CUDA thread is a fiber with its own guarded stack; the blocks of a grid run one after another
// on the calling OS thread (launches are serialised process-wide). __syncthreads is a real block
// barrier; __shfl*_sync, __syncwarp, __ballot_sync, __any_sync, __all_sync are real warp (32-lane)
// rendezvous with CUDA's `width` rules; atomics are real atomics. A barrier or warp intrinsic that some
// thread of the block (or lane of the mask) never reaches is reported as "deadlock (divergent
// synchronisation)" instead of hanging; lanes that disagree on the mask or the intrinsic, a mask that
// leaves out the calling lane or the lane read, a bad width or launch configuration are errors too.
// Static __shared__ variables and the dynamic shared memory of a launch are filled with 0xff bytes (a
// NaN for floats, -1 for integers) before each block, so a read before the block's own write shows.
//
// Env: SIMT_SEED=<n> (n != 0) shuffles the block order and the fiber scheduling order with seed n
// (finds order-dependent bugs); read at every launch.
//
// Under AddressSanitizer (-fsanitize=address) each fiber switch is announced with
// __sanitizer_start_switch_fiber / __sanitizer_finish_switch_fiber, reused fiber stacks are unpoisoned,
// and -fsanitize-sections=simt_shared gives the static __shared__ variables redzones too.
//
// Not modelled: concurrency between blocks (they run in sequence), memory ordering, timing, __half
// device arithmetic, warp intrinsics whose lanes call with different masks at different places.
// __shared__ variables must live in functions of internal linkage (an anonymous namespace, `static`)
// or all have external linkage within one file; mixing the two makes g++ report "section type
// conflict" (they all go into one section, which is what lets the emulator find and poison them).
#pragma once
#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SIMT_ASAN 1
#endif
#endif
#ifdef SIMT_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SIMT_NO_ASAN __attribute__((no_sanitize_address))
#else
#define SIMT_NO_ASAN
#endif

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The static __shared__ variables of this shared object (see __shared__ below); weak and hidden, so a
// library without any has null bounds and each library finds its own.
extern "C" {
extern char __start_simt_shared[] __attribute__((weak, visibility("hidden")));
extern char __stop_simt_shared[] __attribute__((weak, visibility("hidden")));
}

namespace simt {

constexpr int kWarpSize = 32;
constexpr size_t kStack = 256 * 1024, kGuard = 4096;
constexpr size_t kMaxDynamicShared = 48 * 1024;  // without cudaFuncSetAttribute opt-in
constexpr unsigned char kPoison = 0xff;

// --- fiber contexts --------------------------------------------------------------------------------
#if defined(__x86_64__)
// A context is a saved stack pointer: simt_switch pushes the callee-saved registers, MXCSR and the x87
// control word, stores rsp in *from, loads to, pops the same and returns there. No system call (glibc's
// swapcontext makes one per switch to save the signal mask).
struct Context { void* sp = nullptr; };
extern "C" void simt_switch(void** from, void* to);
asm(R"(
  .pushsection .text.simt_switch,"axG",@progbits,simt_switch,comdat
  .globl simt_switch
  .hidden simt_switch
  .type simt_switch,@function
simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw 12(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw 12(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_switch, .-simt_switch
  .popsection
)");
inline void switch_to(Context& from, Context& to) { simt_switch(&from.sp, to.sp); }
// A fresh context that starts entry() on the stack [base, base + size).
inline void make_context(Context& c, void* base, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(base) + size;
  top &= ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                  // entry's (never used) return address: rsp % 16 == 8 at entry
  *--sp = reinterpret_cast<uint64_t>(entry);  // simt_switch's `ret` goes here
  for (int i = 0; i < 6; ++i) *--sp = 0;      // rbp rbx r12 r13 r14 r15
  sp -= 2;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memcpy(reinterpret_cast<char*>(sp) + 8, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 12, &fpucw, 2);
  c.sp = sp;
}
#else
struct Context { ucontext_t uc; };
inline void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context& c, void* base, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// --- block state -----------------------------------------------------------------------------------
struct Thread {
  dim3 idx;
  unsigned linear = 0;
  Context ctx;
  void* stack = nullptr;
  bool done = false;
  enum Wait { kNone, kBar, kWarp } wait = kNone;
  uint64_t wait_gen = 0;
#ifdef SIMT_ASAN
  void* fake_stack = nullptr;
#endif
};

enum WarpKind { kIdx = 1, kUp, kDown, kXor, kSyncWarp, kBallot, kAny, kAll };

struct Warp {
  uint32_t arrived = 0, mask = 0, exists = 0;
  uint64_t gen = 0;
  int op = 0;
  uint64_t in[kWarpSize], out[kWarpSize];
  int src[kWarpSize];
};

struct Block {
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  unsigned bar_arrived = 0;
  uint64_t bar_gen = 0;
  Context sched;
  Thread* cur = nullptr;
  std::function<void()> body;
  std::string error;
  unsigned char* dynamic_shared = nullptr;
  size_t dynamic_bytes = 0;
#ifdef SIMT_ASAN
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#endif
};

inline thread_local Block* g_block = nullptr;
inline thread_local dim3 g_blockIdx, g_blockDim, g_gridDim;
inline thread_local std::string g_last_error;

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error("simt: " + what); }

inline Thread& cur() {
  if (!g_block || !g_block->cur) fail("device function called outside a kernel launch");
  return *g_block->cur;
}

// The ASan protocol: start_switch before every switch (with a null save slot when the fiber we leave
// is finished for good), finish_switch right after arriving.
inline void to_scheduler(bool exiting = false) {
  Block& b = *g_block;
  Thread& t = *b.cur;
#ifdef SIMT_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &t.fake_stack, b.sched_bottom, b.sched_size);
#else
  (void)exiting;
#endif
  switch_to(t.ctx, b.sched);
#ifdef SIMT_ASAN
  __sanitizer_finish_switch_fiber(t.fake_stack, nullptr, nullptr);
#endif
}

inline void to_fiber(Block& b, Thread& t) {
#ifdef SIMT_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, static_cast<char*>(t.stack) + kGuard, kStack);
#endif
  switch_to(b.sched, t.ctx);
#ifdef SIMT_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// Errors inside a fiber cannot unwind across the context switch: record, mark done, never come back.
// printf-style, so nothing on the abandoned fiber's stack owns heap memory (no leak to report).
[[noreturn]] __attribute__((format(printf, 1, 2))) inline void device_fail(const char* fmt, ...) {
  Block* b = g_block;
  char what[256];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(what, sizeof what, fmt, args);
  va_end(args);
  if (b->error.empty()) b->error = what;
  b->cur->done = true;
  to_scheduler(/*exiting=*/true);
  std::abort();
}

inline void fiber_entry() {
  Block* b = g_block;
#ifdef SIMT_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b->sched_bottom, &b->sched_size);
#endif
  try {
    b->body();
  } catch (const std::exception& e) {
    if (b->error.empty()) b->error = std::string("exception in a kernel: ") + e.what();
  } catch (...) {
    if (b->error.empty()) b->error = "exception in a kernel";
  }
  b->cur->done = true;
  to_scheduler(/*exiting=*/true);
  std::abort();  // a finished fiber is never resumed
}

inline void syncthreads() {
  Block& b = *g_block;
  Thread& t = cur();
  t.wait = Thread::kBar;
  t.wait_gen = b.bar_gen;
  if (++b.bar_arrived == b.threads.size()) {
    b.bar_arrived = 0;
    ++b.bar_gen;
  }
  to_scheduler();
}

// CUDA semantics of __shfl*_sync with `width` sub-sections; out-of-section sources return own value.
inline int source_lane(int kind, int lane, int arg, int width) {
  const int base = lane / width * width;
  switch (kind) {
    case kIdx: return base + ((arg % width) + width) % width;
    case kUp: return lane - arg < base ? lane : lane - arg;
    case kDown: return lane + arg >= base + width ? lane : lane + arg;
    case kXor: { const int s = lane ^ arg; return s >= base + width ? lane : s; }
  }
  return lane;
}

// One warp rendezvous: every lane of the mask arrives with its value, the last one fixes all results.
template <typename T>
inline T warp_op(int kind, unsigned mask, T v, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type > 8 bytes");
  Block& b = *g_block;
  Thread& t = cur();
  const int lane = t.linear % kWarpSize;
  const int warp = t.linear / kWarpSize;
  Warp& w = b.warps[warp];
  mask &= w.exists;  // lanes past the end of a partial warp do not exist
  if (width <= 0 || width > kWarpSize || (width & (width - 1)))
    device_fail("shuffle width %d is not a power of 2 <= 32", width);
  if (!((mask >> lane) & 1u))
    device_fail("lane %d of warp %d calls a _sync intrinsic with a mask that excludes it", lane, warp);
  if (w.arrived == 0) {
    w.mask = mask;
    w.op = kind;
  } else if (w.mask != mask || w.op != kind) {
    device_fail("lanes of warp %d disagree on the mask or the intrinsic", warp);
  }
  const bool shuffle = kind <= kXor;
  const int src = shuffle ? source_lane(kind, lane, arg, width) : lane;
  if (!((mask >> src) & 1u))
    device_fail("lane %d of warp %d reads lane %d, which is not in the mask (undefined)", lane, warp, src);
  w.in[lane] = 0;
  std::memcpy(&w.in[lane], &v, sizeof(T));
  w.src[lane] = src;
  w.arrived |= 1u << lane;
  t.wait = Thread::kWarp;
  t.wait_gen = w.gen;
  if (w.arrived == w.mask) {  // the last lane: every lane's result is fixed now
    uint32_t votes = 0;
    for (int l = 0; l < kWarpSize; ++l)
      if (((w.mask >> l) & 1u) && w.in[l] != 0) votes |= 1u << l;
    for (int l = 0; l < kWarpSize; ++l) {
      if (!((w.mask >> l) & 1u)) continue;
      switch (w.op) {
        case kBallot: w.out[l] = votes; break;
        case kAny: w.out[l] = votes != 0; break;
        case kAll: w.out[l] = votes == w.mask; break;
        default: w.out[l] = w.in[w.src[l]];
      }
    }
    w.arrived = 0;
    ++w.gen;
  }
  to_scheduler();
  T r;
  std::memcpy(&r, &w.out[lane], sizeof(T));
  return r;
}

struct Stacks {
  std::vector<void*> free;
  ~Stacks() {  // at the exit of the OS thread that launched kernels
    for (void* p : free) {
#ifdef SIMT_ASAN
      // Frames left on a fiber stack keep their redzones poisoned in the shadow, and ASan does not
      // clear it at munmap: whatever is mapped there next (a Python arena) would seem to overflow.
      __asan_unpoison_memory_region(static_cast<char*>(p) + kGuard, kStack);
#endif
      munmap(p, kStack + kGuard);
    }
  }
  void* get() {
    void* p;
    if (!free.empty()) {
      p = free.back();
      free.pop_back();
    } else {
      p = mmap(nullptr, kStack + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) fail("mmap of a fiber stack failed");
      mprotect(p, kGuard, PROT_NONE);  // a stack overflow faults instead of corrupting memory
    }
#ifdef SIMT_ASAN
    // A fiber abandoned after an error leaves its frames' redzones poisoned.
    __asan_unpoison_memory_region(static_cast<char*>(p) + kGuard, kStack);
#endif
    return p;
  }
};
inline thread_local Stacks g_stacks;

// Byte stores the sanitizer does not check: the static shared section holds redzones under ASan.
SIMT_NO_ASAN inline void poison(void* p, size_t n) {
  volatile unsigned char* c = static_cast<volatile unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) c[i] = kPoison;
}

inline void poison_shared(Block& b) {
  char *first = __start_simt_shared, *last = __stop_simt_shared;
  if (first && last > first)
    poison(first, static_cast<size_t>(last - first));
  if (b.dynamic_bytes) poison(b.dynamic_shared, b.dynamic_bytes);
}

inline unsigned env_seed() {
  const char* s = std::getenv("SIMT_SEED");
  return s ? static_cast<unsigned>(std::strtoul(s, nullptr, 10)) : 0u;
}

inline void run_block(Block& b, const dim3& block, std::mt19937* rng) {
  const unsigned n = block.x * block.y * block.z;
  b.threads.assign(n, Thread{});
  b.warps.assign((n + kWarpSize - 1) / kWarpSize, Warp{});
  for (unsigned i = 0; i < n; ++i) b.warps[i / kWarpSize].exists |= 1u << (i % kWarpSize);
  b.bar_arrived = 0;
  b.error.clear();
  poison_shared(b);
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.linear = i;
    t.idx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    t.stack = g_stacks.get();
    make_context(t.ctx, static_cast<char*>(t.stack) + kGuard, kStack, fiber_entry);
  }
  std::vector<unsigned> order(n);
  std::iota(order.begin(), order.end(), 0u);
  unsigned live = n;
  while (live > 0 && b.error.empty()) {
    if (rng) std::shuffle(order.begin(), order.end(), *rng);
    bool progress = false;
    for (unsigned i : order) {
      Thread& t = b.threads[i];
      if (t.done) continue;
      if (t.wait == Thread::kBar && t.wait_gen == b.bar_gen) continue;
      if (t.wait == Thread::kWarp && t.wait_gen == b.warps[i / kWarpSize].gen) continue;
      t.wait = Thread::kNone;
      b.cur = &t;
      to_fiber(b, t);
      b.cur = nullptr;
      progress = true;
      if (t.done) --live;
      if (!b.error.empty()) break;
    }
    if (!progress && b.error.empty()) {
      unsigned at_bar = 0, at_warp = 0, exited = 0;
      for (auto& t : b.threads) {
        if (t.done) ++exited;
        else if (t.wait == Thread::kBar) ++at_bar;
        else ++at_warp;
      }
      b.error = "deadlock (divergent synchronisation): " + std::to_string(at_bar) + " threads wait at __syncthreads, " +
                std::to_string(at_warp) + " at a warp _sync intrinsic whose other lanes never arrive, " +
                std::to_string(exited) + " have exited";
    }
  }
  for (auto& t : b.threads) g_stacks.free.push_back(t.stack);
  if (!b.error.empty())
    fail("block (" + std::to_string(g_blockIdx.x) + "," + std::to_string(g_blockIdx.y) + "," +
         std::to_string(g_blockIdx.z) + "): " + b.error);
}

// Launches are serialised: static __shared__ storage is one per process.
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// The largest grid a grid-stride kernel asks for (launch code reads it through grid_cap); tests lower
// it so small inputs take more than one round of the grid-stride loops.
inline std::atomic<int64_t>& grid_cap_override() {
  static std::atomic<int64_t> v{0};
  return v;
}
inline int64_t grid_cap(int64_t device_default) {
  const int64_t v = grid_cap_override().load();
  return v > 0 ? v : device_default;
}

// Kernel launches so far (a test can tell that an op went through the emulated kernels).
inline std::atomic<int64_t>& launch_count() {
  static std::atomic<int64_t> v{0};
  return v;
}

struct Stream {};

struct Launch {
  dim3 grid, block;
  size_t smem;
  Launch(dim3 g, dim3 bl, size_t s = 0, Stream = {}) : grid(g), block(bl), smem(s) {}
  // A kernel launch: the arguments are converted to the kernel's parameter types and copied, as CUDA
  // does. Errors are kept for last_error() (C10_CUDA_KERNEL_LAUNCH_CHECK raises them).
  template <typename... P, typename... A>
  void run(void (*kernel)(P...), A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
    std::lock_guard<std::mutex> lock(launch_mutex());
    ++launch_count();
    g_last_error.clear();
    try {
      const unsigned long long threads = 1ull * block.x * block.y * block.z;
      if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
        fail("invalid block size (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
             std::to_string(block.z) + ")");
      if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
        fail("invalid grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," + std::to_string(grid.z) + ")");
      if (smem > kMaxDynamicShared) fail("dynamic shared memory above 48 KiB without opt-in");
      std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
      Block b;
      std::unique_ptr<unsigned char[]> dyn(smem ? new unsigned char[smem] : nullptr);
      b.dynamic_shared = dyn.get();
      b.dynamic_bytes = smem;
      Block* saved = g_block;
      g_block = &b;
      b.body = [&] { std::apply(kernel, params); };
      g_gridDim = grid;
      g_blockDim = block;
      const unsigned seed = env_seed();
      std::mt19937 rng(seed);
      std::vector<dim3> blocks;
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
      if (seed) std::shuffle(blocks.begin(), blocks.end(), rng);
      try {
        for (const dim3& bi : blocks) {
          g_blockIdx = bi;
          run_block(b, block, seed ? &rng : nullptr);
        }
      } catch (...) {
        g_block = saved;
        throw;
      }
      g_block = saved;
    } catch (const std::exception& e) {
      g_last_error = e.what();
    }
  }
};

inline const std::string& last_error() { return g_last_error; }

// The dynamic shared memory of the running block (the launch's third <<<>>> argument).
template <typename T>
inline T* dynamic_shared() {
  if (!g_block) fail("dynamic shared memory used outside a kernel launch");
  return reinterpret_cast<T*>(g_block->dynamic_shared);
}

// --- atomics (real ones) ----------------------------------------------------------------------------
template <typename T>
inline T atomic_or(T* p, T v) { return std::atomic_ref<T>(*p).fetch_or(v); }
template <typename T>
inline T atomic_and(T* p, T v) { return std::atomic_ref<T>(*p).fetch_and(v); }
template <typename T>
inline T atomic_add(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (!a.compare_exchange_weak(old, static_cast<T>(old + v))) {}
  return old;
}
// Store v while it beats the value held (better(v, old)); returns the old value, as CUDA's atomicMax/Min.
template <typename T, typename Better>
inline T atomic_keep_best(T* p, T v, Better better) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (better(v, old) && !a.compare_exchange_weak(old, v)) {}
  return old;
}
template <typename T>
inline T atomic_max(T* p, T v) { return atomic_keep_best(p, v, [](T x, T y) { return y < x; }); }
template <typename T>
inline T atomic_min(T* p, T v) { return atomic_keep_best(p, v, [](T x, T y) { return x < y; }); }
template <typename T>
inline T atomic_cas(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;  // the old value either way
}
template <typename T>
inline T atomic_exch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }

}  // namespace simt

// --- the CUDA names -----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// Static shared memory: one instance per process in the section simt_shared, poisoned before each block.
#define __shared__ static __attribute__((section("simt_shared"), aligned(16)))
#define threadIdx (::simt::cur().idx)
#define blockIdx (::simt::g_blockIdx)
#define blockDim (::simt::g_blockDim)
#define gridDim (::simt::g_gridDim)
constexpr int warpSize = ::simt::kWarpSize;

inline void __syncthreads() { ::simt::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::simt::warp_op<int>(::simt::kSyncWarp, mask, 0, 0, 32); }
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return ::simt::warp_op<unsigned>(::simt::kBallot, mask, pred != 0, 0, 32);
}
inline int __any_sync(unsigned mask, int pred) { return ::simt::warp_op<unsigned>(::simt::kAny, mask, pred != 0, 0, 32); }
inline int __all_sync(unsigned mask, int pred) { return ::simt::warp_op<unsigned>(::simt::kAll, mask, pred != 0, 0, 32); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
inline T __shfl_sync(unsigned m, T v, int src, int w = 32) { return ::simt::warp_op(::simt::kIdx, m, v, src, w); }
template <typename T>
inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) { return ::simt::warp_op(::simt::kUp, m, v, int(d), w); }
template <typename T>
inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) { return ::simt::warp_op(::simt::kDown, m, v, int(d), w); }
template <typename T>
inline T __shfl_xor_sync(unsigned m, T v, int lm, int w = 32) { return ::simt::warp_op(::simt::kXor, m, v, lm, w); }

template <typename T> inline T atomicOr(T* p, T v) { return ::simt::atomic_or(p, v); }
template <typename T> inline T atomicAnd(T* p, T v) { return ::simt::atomic_and(p, v); }
template <typename T> inline T atomicAdd(T* p, T v) { return ::simt::atomic_add(p, v); }
template <typename T> inline T atomicMax(T* p, T v) { return ::simt::atomic_max(p, v); }
template <typename T> inline T atomicMin(T* p, T v) { return ::simt::atomic_min(p, v); }
template <typename T> inline T atomicCAS(T* p, T e, T d) { return ::simt::atomic_cas(p, e, d); }
template <typename T> inline T atomicExch(T* p, T v) { return ::simt::atomic_exch(p, v); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
template <typename T> inline T __ldg(const T* p) { return *p; }

// Device intrinsics used by device code (IEEE round-to-nearest-even, as on the GPU).
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline long long __double2ll_rn(double y) { return __builtin_llrint(y); }  // default rounding mode: nearest-even
inline double __ll2double_rn(long long a) { return static_cast<double>(a); }
inline double __ull2double_rn(unsigned long long a) { return static_cast<double>(a); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
// CUDA's math headers declare isfinite etc. in the global namespace for device code.
inline bool isfinite(double x) { return std::isfinite(x); }
inline bool isfinite(float x) { return std::isfinite(x); }
