// Self-test of simt.h: block barriers, shuffles of every kind and width, __syncwarp, votes, atomics,
// dynamic and static shared memory (and its poisoning), launch checks and divergence errors.
// Prints one line per check and "simt selftest: N checks, M failures"; exits 1 on a failure.
// `selftest oob` runs a kernel with a planted off-by-one read instead, `selftest oob_shared` one that
// writes past a __shared__ array (AddressSanitizer must stop both).
#include "simt.h"

#include <cstdio>
#include <string>
#include <vector>

namespace {

int g_checks = 0, g_failures = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) ++g_failures;
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
}

bool error_has(const char* needle) { return simt::last_error().find(needle) != std::string::npos; }

// --- kernels -----------------------------------------------------------------------------------------
__global__ void block_sum(const double* x, double* out, int n) {
  __shared__ double partial[32];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  double v = i < n ? x[i] : 0.0;
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.0;
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) atomicAdd(out, v);
  }
}

// Several barrier phases: reverse the block's values in shared memory, twice shifted.
__global__ void barrier_phases(int* out) {
  __shared__ int a[256];
  __shared__ int b[256];
  const int t = threadIdx.x, n = blockDim.x;
  a[t] = t + 1000 * blockIdx.x;
  __syncthreads();
  b[t] = a[n - 1 - t];
  __syncthreads();
  a[t] = b[(t + 1) % n] * 2;
  __syncthreads();
  out[blockIdx.x * n + t] = a[t];
}

// Lane results of each shuffle kind for one (kind, arg, width); 64-bit values to check full copies.
__global__ void shuffles(long long* out, int kind, int arg, int width) {
  const int lane = threadIdx.x % 32;
  const long long v = (static_cast<long long>(lane) << 40) + 7 * threadIdx.x;
  long long r = 0;
  switch (kind) {
    case 0: r = __shfl_sync(0xffffffffu, v, arg, width); break;
    case 1: r = __shfl_up_sync(0xffffffffu, v, arg, width); break;
    case 2: r = __shfl_down_sync(0xffffffffu, v, arg, width); break;
    case 3: r = __shfl_xor_sync(0xffffffffu, v, arg, width); break;
  }
  out[threadIdx.x] = r;
}

__global__ void float_shuffle(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 0.5f * threadIdx.x, 3);
}

// Lanes exchange through shared memory with __syncwarp between the write and the read.
__global__ void syncwarp_exchange(int* out) {
  __shared__ int s[64];
  s[threadIdx.x] = 3 * threadIdx.x;
  __syncwarp();
  out[threadIdx.x] = s[threadIdx.x ^ 31];
}

// Votes over the full warp and over the even lanes only.
__global__ void votes(unsigned* out, int pattern) {
  const int lane = threadIdx.x % 32;
  const int pred = pattern == 0 ? lane % 3 == 0 : pattern == 1 ? 1 : 0;
  out[threadIdx.x * 4 + 0] = __ballot_sync(0xffffffffu, pred);
  out[threadIdx.x * 4 + 1] = __any_sync(0xffffffffu, pred);
  out[threadIdx.x * 4 + 2] = __all_sync(0xffffffffu, pred);
  out[threadIdx.x * 4 + 3] = lane % 2 == 0 ? __ballot_sync(0x55555555u, lane % 4 == 0) : 0u;
}

struct Atomics {
  int add_i;
  unsigned long long add_u, or_u, and_u;
  float add_f;
  double add_d;
  int max_i, min_i, cas_winners, exch;
};

__global__ void atomics(Atomics* a) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&a->add_i, 1);
  atomicAdd(&a->add_u, static_cast<unsigned long long>(i));
  atomicOr(&a->or_u, 1ull << (i % 64));
  atomicAnd(&a->and_u, ~(1ull << (i % 64)) | (i % 2 ? ~0ull : 0ull));
  atomicAdd(&a->add_f, 0.25f);
  atomicAdd(&a->add_d, 0.5);
  atomicMax(&a->max_i, (i * 37) % 1001);
  atomicMin(&a->min_i, 500 - (i * 37) % 1001);
  if (atomicCAS(&a->exch, -1, i) == -1) atomicAdd(&a->cas_winners, 1);
}

// Block of (8, 4, 2): threadIdx components and the linear id agree; blockIdx in 2-D grids.
__global__ void index_3d(int* out) {
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int b = blockIdx.x + gridDim.x * blockIdx.y;
  out[b * 64 + t] = threadIdx.x * 10000 + threadIdx.y * 100 + threadIdx.z + 1000000 * b;
}

// Dynamic shared memory: reverse the block in it.
__global__ void dynamic_reverse(const double* x, double* y) {
  double* s = ::simt::dynamic_shared<double>();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  s[threadIdx.x] = x[i];
  __syncthreads();
  y[i] = s[blockDim.x - 1 - threadIdx.x];
}

// Read shared memory before any write (each block writes it only afterwards): must see the poison.
__global__ void read_before_write(double* out, long long* out_i, int* dyn_out) {
  __shared__ double d[4];
  __shared__ long long k[4];
  int* dyn = ::simt::dynamic_shared<int>();
  if (threadIdx.x == 0) {
    out[blockIdx.x] = d[1];
    out_i[blockIdx.x] = k[2];
    dyn_out[blockIdx.x] = dyn[3];
  }
  __syncthreads();
  d[threadIdx.x % 4] = 1.0;
  k[threadIdx.x % 4] = 5;
  dyn[threadIdx.x % 4] = 9;
}

__global__ void divergent_barrier(int* p) {
  if (threadIdx.x < 100) return;
  __syncthreads();
  p[threadIdx.x] = 1;
}
__global__ void divergent_shuffle(int* p) {
  int v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  p[threadIdx.x] = v;
}
__global__ void mask_excludes_self(int* p) { p[threadIdx.x] = __shfl_sync(0x1u, 1, 0); }
__global__ void reads_outside_mask(int* p) {
  if (threadIdx.x % 32 < 16) p[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 1, 8);
}
__global__ void mixed_intrinsics(int* p) {
  if (threadIdx.x % 2) p[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  else p[threadIdx.x] = __ballot_sync(0xffffffffu, 1);
}
__global__ void bad_width(int* p) { p[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1, 12); }
__global__ void early_exit_before_shuffle(const int* x, int* p, int n) {
  const int i = threadIdx.x;
  if (i >= n) return;  // the lanes past n never reach the shuffle below
  p[i] = __shfl_xor_sync(0xffffffffu, x[i], 1);
}

__global__ void shared_overflow(float* y) {
  __shared__ float s[32];
  s[threadIdx.x] = 1.0f;  // planted bug: a block of 33 threads writes s[32]
  __syncthreads();
  y[threadIdx.x] = s[threadIdx.x];
}

__global__ void off_by_one(const float* x, float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i + 1];  // planted bug: reads x[n] in the last thread
}

// --- reference shuffles, from the CUDA programming guide's definitions --------------------------------
int expected_source(int kind, int lane, int arg, int width) {
  const int first = lane - lane % width;
  switch (kind) {
    case 0: return first + arg % width;
    case 1: return lane % width >= arg ? lane - arg : lane;
    case 2: return lane % width + arg < width ? lane + arg : lane;
    default: { const int s = lane ^ arg; return s < first + width ? s : lane; }  // later groups: own value
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "oob") {
    const int n = 100;
    std::vector<float> x(n, 1.0f), y(n);
    simt::Launch(1, 128).run(off_by_one, x.data(), y.data(), n);
    std::printf("off_by_one ran to the end: error='%s'\n", simt::last_error().c_str());
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "oob_shared") {
    std::vector<float> y(33);
    simt::Launch(1, 33).run(shared_overflow, y.data());
    std::printf("shared_overflow ran to the end: error='%s'\n", simt::last_error().c_str());
    return 0;
  }

  {  // reductions over several blocks, the last one partial
    for (int n : {1, 31, 1000, 4097}) {
      std::vector<double> x(n);
      double want = 0;
      for (int i = 0; i < n; ++i) want += (x[i] = 0.5 * i);
      double out = 0;
      simt::Launch((n + 255) / 256, 256).run(block_sum, x.data(), &out, n);
      check(out == want && simt::last_error().empty(), "block_sum n=" + std::to_string(n));
    }
  }
  {
    std::vector<int> out(3 * 256);
    simt::Launch(3, 256).run(barrier_phases, out.data());
    bool ok = simt::last_error().empty();
    for (int b = 0; b < 3; ++b)
      for (int t = 0; t < 256; ++t) ok &= out[b * 256 + t] == 2 * ((256 - 1 - (t + 1) % 256) + 1000 * b);
    check(ok, "__syncthreads: three barrier phases in 3 blocks of 256");
  }
  {
    const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
    for (int kind = 0; kind < 4; ++kind) {
      bool ok = true;
      for (int width = 1; width <= 32; width *= 2)
        for (int arg : {0, 1, 2, 3, 5, 8, 16, 31}) {
          std::vector<long long> out(64);
          simt::Launch(1, 64).run(shuffles, out.data(), kind, arg, width);
          ok &= simt::last_error().empty();
          for (int t = 0; t < 64; ++t) {
            const int src = (t / 32) * 32 + expected_source(kind, t % 32, arg, width);
            ok &= out[t] == (static_cast<long long>(src % 32) << 40) + 7 * src;
          }
        }
      check(ok, std::string(names[kind]) + " (64-bit values), widths 1..32, offsets 0..31, two warps");
    }
    std::vector<float> f(32);
    simt::Launch(1, 32).run(float_shuffle, f.data());
    bool ok = true;
    for (int t = 0; t < 32; ++t) ok &= f[t] == 0.5f * (t ^ 3);
    check(ok, "__shfl_xor_sync of floats");
  }
  {
    std::vector<int> out(64);
    simt::Launch(1, 64).run(syncwarp_exchange, out.data());
    bool ok = simt::last_error().empty();
    for (int t = 0; t < 64; ++t) ok &= out[t] == 3 * (t ^ 31);
    check(ok, "__syncwarp orders shared memory between lanes");
  }
  {
    bool ok = true;
    for (int pattern = 0; pattern < 3; ++pattern) {
      std::vector<unsigned> out(64 * 4);
      simt::Launch(1, 64).run(votes, out.data(), pattern);
      ok &= simt::last_error().empty();
      unsigned ballot = 0;
      for (int l = 0; l < 32; ++l)
        if (pattern == 0 ? l % 3 == 0 : pattern == 1) ballot |= 1u << l;
      for (int t = 0; t < 64; ++t) {
        ok &= out[t * 4 + 0] == ballot && out[t * 4 + 1] == (ballot != 0) && out[t * 4 + 2] == (ballot == ~0u);
        ok &= out[t * 4 + 3] == (t % 2 == 0 ? 0x11111111u : 0u);
      }
    }
    check(ok, "__ballot_sync, __any_sync, __all_sync (full and partial masks)");
  }
  {
    Atomics a{};
    a.and_u = ~0ull;
    a.max_i = -1;
    a.min_i = 1 << 30;
    a.exch = -1;
    const int blocks = 5, threads = 96, n = blocks * threads;
    simt::Launch(blocks, threads).run(atomics, &a);
    int mx = -1, mn = 1 << 30;
    for (int i = 0; i < n; ++i) {
      mx = std::max(mx, (i * 37) % 1001);
      mn = std::min(mn, 500 - (i * 37) % 1001);
    }
    unsigned long long and_want = ~0ull;
    for (int i = 0; i < n; ++i) and_want &= ~(1ull << (i % 64)) | (i % 2 ? ~0ull : 0ull);
    const bool ok = simt::last_error().empty() && a.add_i == n && a.add_u == 1ull * n * (n - 1) / 2 && a.or_u == ~0ull &&
                    a.and_u == and_want && a.add_f == 0.25f * n && a.add_d == 0.5 * n && a.max_i == mx &&
                    a.min_i == mn && a.cas_winners == 1 && a.exch >= 0;
    check(ok, "atomicAdd (int, u64, float, double), atomicOr/And/Max/Min/CAS over 5 blocks");
  }
  {
    std::vector<int> out(6 * 64);
    simt::Launch(dim3(3, 2), dim3(8, 4, 2)).run(index_3d, out.data());
    bool ok = simt::last_error().empty();
    for (int b = 0; b < 6; ++b)
      for (int z = 0; z < 2; ++z)
        for (int y = 0; y < 4; ++y)
          for (int x = 0; x < 8; ++x) ok &= out[b * 64 + x + 8 * (y + 4 * z)] == x * 10000 + y * 100 + z + 1000000 * b;
    check(ok, "threadIdx.x/y/z, blockIdx.x/y and gridDim in a 3x2 grid of 8x4x2 blocks");
  }
  {
    const int blocks = 3, threads = 128;
    std::vector<double> x(blocks * threads), y(blocks * threads);
    for (size_t i = 0; i < x.size(); ++i) x[i] = double(i);
    simt::Launch(blocks, threads, threads * sizeof(double)).run(dynamic_reverse, x.data(), y.data());
    bool ok = simt::last_error().empty();
    for (int b = 0; b < blocks; ++b)
      for (int t = 0; t < threads; ++t) ok &= y[b * threads + t] == x[b * threads + threads - 1 - t];
    check(ok, "dynamic shared memory (the launch's third argument)");
  }
  {
    std::vector<double> d(3);
    std::vector<long long> k(3);
    std::vector<int> dyn(3);
    simt::Launch(3, 64, 16 * sizeof(int)).run(read_before_write, d.data(), k.data(), dyn.data());
    bool ok = simt::last_error().empty();
    for (int b = 0; b < 3; ++b) ok &= std::isnan(d[b]) && k[b] == -1 && dyn[b] == -1;
    check(ok, "shared memory (static and dynamic) is poisoned before every block");
  }
  {
    std::vector<int> p(256);
    std::vector<int> x(64, 1);
    simt::Launch(1, 256).run(divergent_barrier, p.data());
    check(error_has("deadlock (divergent synchronisation)"), "a __syncthreads that part of the block skips: " + simt::last_error());
    simt::Launch(1, 64).run(divergent_shuffle, p.data());
    check(error_has("deadlock (divergent synchronisation)"), "a shuffle in a divergent branch: " + simt::last_error());
    simt::Launch(1, 64).run(early_exit_before_shuffle, x.data(), p.data(), 40);
    check(error_has("deadlock (divergent synchronisation)"), "lanes that exit before a full-mask shuffle: " + simt::last_error());
    simt::Launch(1, 32).run(mask_excludes_self, p.data());
    check(error_has("excludes it"), "a mask that excludes the calling lane: " + simt::last_error());
    simt::Launch(1, 32).run(reads_outside_mask, p.data());
    check(error_has("not in the mask"), "a shuffle reading a lane outside the mask: " + simt::last_error());
    simt::Launch(1, 32).run(mixed_intrinsics, p.data());
    check(error_has("disagree"), "lanes calling different intrinsics: " + simt::last_error());
    simt::Launch(1, 32).run(bad_width, p.data());
    check(error_has("not a power of 2"), "a shuffle width of 12: " + simt::last_error());
    simt::Launch(1, 2000).run(bad_width, p.data());
    check(error_has("invalid block size"), "a block of 2000 threads: " + simt::last_error());
    simt::Launch(0, 32).run(bad_width, p.data());
    check(error_has("invalid grid"), "an empty grid: " + simt::last_error());
    simt::Launch(1, 32, 64 * 1024).run(bad_width, p.data());
    check(error_has("48 KiB"), "64 KiB of dynamic shared memory: " + simt::last_error());
    double out = 0;
    std::vector<double> ones(64, 1.0);
    simt::Launch(1, 64).run(block_sum, ones.data(), &out, 64);
    check(out == 64.0 && simt::last_error().empty(), "a launch after the errors works");
  }
  std::printf("simt selftest (SIMT_SEED=%u): %d checks, %d failures\n", simt::env_seed(), g_checks, g_failures);
  return g_failures ? 1 : 0;
}
