// Exact reversible SGD with momentum (Maclaurin, Duvenaud & Adams 2015), one element at a time.
// Shared by the CPU loop (csrc/cpu/reversible_cpu.cpp) and the CUDA kernel
// (csrc/cuda/reversible_cuda.cu), so the CPU tests check the code the GPU runs and both produce the
// same bits.
//
// State of one element: weight x and velocity v as int64 fixed point (value = int * 2^-radix), and an
// information buffer that stores the bits the momentum multiply destroys. The buffer is a range-ANS
// coder per element: a uint64 head kept in [2^32, 2^64) (2^32 = empty) and a stack of uint32 words
// spilled from it, stored as a dense (capacity, N) tensor (row k = word k of every element, so
// neighbouring GPU threads touch neighbouring words) with a per-element count.
//
// gamma = n / 2^16 (n in [1, 2^16]) is applied as a bijection on (v, buffer):
//   forward: push(v mod 2^16, 2^16); v = floor(v / 2^16) * n + pop(n)
//   reverse: push(v mod n, n);       v = floor(v / n) * 2^16 + pop(2^16)
// pop(n) decodes a near-uniform distribution of total 2^32 (the first 2^32 mod n symbols have
// frequency q+1, the others q = 2^32 div n), closed-form cumulative counts, no tables. The buffer grows
// by about -log2(gamma) bits per element per step.
//
// Every floating-point operation on the exact path is a single multiply followed by a conversion
// (never a + b * c), so host and device round identically (no FMA contraction can apply).
// An element whose step would overflow the fixed-point range, meets a non-finite gradient, or finds
// its stack full is left untouched and reported through a flag; the caller raises.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

// Device code is nvcc's device pass, or the CUDA kernels compiled for the SIMT emulator (STN_EXT_SIMT),
// whose header provides the same intrinsics. (__CUDA_ARCH__ is spelled out in each condition, as nvcc's
// front end expects of host-only branches in __host__ __device__ functions.)
#ifdef STN_EXT_SIMT
#include "simt.h"
#endif
#if !defined(__CUDA_ARCH__) && !defined(STN_EXT_SIMT) && (defined(__x86_64__) || defined(_M_X64))
#include <emmintrin.h>
#endif

namespace stn_ext {
namespace rev {

constexpr int kDenBits = 16;
constexpr int64_t kDen = int64_t(1) << kDenBits;  // gamma = n / kDen
constexpr uint64_t kHeadLow = uint64_t(1) << 32;   // head lives in [2^32, 2^64); 2^32 = empty buffer
constexpr double kTwo63 = 9223372036854775808.0;   // 2^63

// Status flags (OR-ed into status[0]); status[1] holds the largest stack count seen.
enum : uint64_t {
  kOverflow = 1,    // fixed-point range exceeded (weight, velocity or a converted product)
  kNonFinite = 2,   // NaN or infinite gradient
  kStackFull = 4,   // no room to spill a word (the caller keeps enough capacity; internal error)
  kStackEmpty = 8,  // a refill from an empty stack: the state is not one a forward pass produced
};

// Per-call constants of one step.
struct Params {
  double lr;              // learning rate alpha (x += alpha v)
  double one_minus_gamma; // (kDen - n) / kDen, exact in double
  double scale;           // 2^radix
  double inv_scale;       // 2^-radix
  int64_t n;              // gamma numerator in [1, kDen]
  uint32_t q;             // 2^32 div n (n >= 2)
  uint32_t rem;           // 2^32 mod n
  uint64_t boundary;      // rem * (q + 1): slots below it belong to symbols of frequency q + 1
  double inv_n, inv_q, inv_q1;  // 1/n, 1/q, 1/(q+1): first guesses of divisions, corrected exactly
  uint64_t magic_q, magic_q1;   // ceil(2^64 / q), ceil(2^64 / (q+1)): exact division of 32-bit numbers
  uint64_t magic_n;             // ceil(2^64 / n): exact division of numbers below 2^48 by n < 2^16
  uint64_t shift_q, shift_r;    // 2^31 = shift_q n + shift_r
};

inline Params make_params(double lr, int64_t n, int64_t radix_bits) {
  Params p;
  p.lr = lr;
  p.n = n;
  p.one_minus_gamma = static_cast<double>(kDen - n) / static_cast<double>(kDen);
  p.scale = std::ldexp(1.0, static_cast<int>(radix_bits));
  p.inv_scale = std::ldexp(1.0, -static_cast<int>(radix_bits));
  if (n >= 2 && n < kDen) {
    const uint64_t total = uint64_t(1) << 32;
    p.q = static_cast<uint32_t>(total / static_cast<uint64_t>(n));
    p.rem = static_cast<uint32_t>(total % static_cast<uint64_t>(n));
    p.boundary = static_cast<uint64_t>(p.rem) * (static_cast<uint64_t>(p.q) + 1);
    p.inv_q = 1.0 / static_cast<double>(p.q);
    p.inv_q1 = 1.0 / (static_cast<double>(p.q) + 1.0);
    p.magic_q = UINT64_MAX / p.q + 1;
    p.magic_q1 = UINT64_MAX / (static_cast<uint64_t>(p.q) + 1) + 1;
  } else {
    p.magic_q = p.magic_q1 = 0;
    p.q = 0;
    p.rem = 0;
    p.boundary = 0;
    p.inv_q = p.inv_q1 = 0.0;
  }
  p.inv_n = 1.0 / static_cast<double>(n);
  p.magic_n = n >= 2 ? UINT64_MAX / static_cast<uint64_t>(n) + 1 : 0;
  p.shift_q = (uint64_t(1) << 31) / static_cast<uint64_t>(n);
  p.shift_r = (uint64_t(1) << 31) % static_cast<uint64_t>(n);
  return p;
}

// --- exact arithmetic helpers -------------------------------------------------------------------

C10_HOST_DEVICE inline bool finite(double a) {
#if defined(__CUDA_ARCH__) || defined(STN_EXT_SIMT)
  return isfinite(a);
#else
  return std::isfinite(a);
#endif
}

C10_HOST_DEVICE inline double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__) || defined(STN_EXT_SIMT)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// a + b rounded once; with mul_rn, a + b * c in two roundings (nvcc would otherwise fuse it into one FMA).
C10_HOST_DEVICE inline double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__) || defined(STN_EXT_SIMT)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// dv + lr * dx, the adjoint velocity's update in the reverse pass: the same bits on host and device.
C10_HOST_DEVICE inline double adjoint_velocity(double dv, double lr, double dx) {
  return add_rn(dv, mul_rn(lr, dx));
}

// round-to-nearest-even of y into int64; sets *ok = false when |y| >= 2^63 or y is NaN.
C10_HOST_DEVICE inline int64_t to_fixed(double y, bool* ok) {
  if (!(y < kTwo63 && y > -kTwo63)) {
    *ok = false;
    return 0;
  }
#if defined(__CUDA_ARCH__) || defined(STN_EXT_SIMT)
  return __double2ll_rn(y);
#elif defined(__x86_64__) || defined(_M_X64)
  return _mm_cvtsd_si64(_mm_set_sd(y));  // current rounding mode: nearest-even unless changed
#else
  return static_cast<int64_t>(std::nearbyint(y));
#endif
}

C10_HOST_DEVICE inline double to_double(int64_t a) {
#if defined(__CUDA_ARCH__) || defined(STN_EXT_SIMT)
  return __ll2double_rn(a);
#else
  return static_cast<double>(a);
#endif
}

C10_HOST_DEVICE inline int64_t add_checked(int64_t a, int64_t b, bool* ok) {
  const int64_t r = static_cast<int64_t>(static_cast<uint64_t>(a) + static_cast<uint64_t>(b));
  if (((a ^ r) & (b ^ r)) < 0) *ok = false;
  return r;
}

C10_HOST_DEVICE inline int64_t sub_checked(int64_t a, int64_t b, bool* ok) {
  const int64_t r = static_cast<int64_t>(static_cast<uint64_t>(a) - static_cast<uint64_t>(b));
  if (((a ^ b) & (a ^ r)) < 0) *ok = false;
  return r;
}

C10_HOST_DEVICE inline double u64_to_double(uint64_t a) {
#if defined(__CUDA_ARCH__) || defined(STN_EXT_SIMT)
  return __ull2double_rn(a);
#else
  return static_cast<double>(a);
#endif
}

// a / d and a % d for unsigned a, d without a hardware 64-bit division: a first guess from the
// double reciprocal (off by at most one when a / d < 2^52 and d >= 2^16 or a < 2^53), then exact
// correction, so the result is exact and the same on host and device.
C10_HOST_DEVICE inline uint64_t udiv(uint64_t a, uint64_t d, double inv_d, uint64_t* r) {
  // signed conversions when a < 2^63 (cheaper than unsigned ones on x86 without AVX-512); same values
  const double ad = static_cast<int64_t>(a) >= 0 ? to_double(static_cast<int64_t>(a)) : u64_to_double(a);
  const double qd = mul_rn(ad, inv_d);  // < 2^63: a / d < 2^48 wherever udiv is used
  uint64_t q = static_cast<uint64_t>(static_cast<int64_t>(qd));  // truncation, as on the device
  int64_t rr = static_cast<int64_t>(a - q * d);
  while (rr < 0) {
    rr += static_cast<int64_t>(d);
    --q;
  }
  while (rr >= static_cast<int64_t>(d)) {
    rr -= static_cast<int64_t>(d);
    ++q;
  }
  *r = static_cast<uint64_t>(rr);
  return q;
}

// floor(a / d) with magic = ceil(2^64 / d): one high multiply, exact whenever a < 2^N and d <= 2^L
// with N + L <= 64 (Lemire, Kaser & Kurz 2019, "Faster remainder by direct computation", Theorem 1):
// here a, d < 2^32, or a < 2^48 and d < 2^16.
C10_HOST_DEVICE inline uint64_t div_magic(uint64_t a, uint64_t magic) {
#if defined(__CUDA_ARCH__) || defined(STN_EXT_SIMT)
  return __umul64hi(magic, a);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(magic) * a) >> 64);
#endif
}

// floor(w / n) and w mod n (in [0, n)) for any int64 w and 2 <= n < 2^16: long division in two
// 32-bit digits, each by div_magic.
C10_HOST_DEVICE inline int64_t floordiv(int64_t w, const Params& p, uint64_t* r) {
  const uint64_t n = static_cast<uint64_t>(p.n);
  const int64_t hi = w >> 32;  // |hi| <= 2^31
  const uint64_t lo = static_cast<uint64_t>(w) & 0xffffffffull;
  // hi + 2^31 = qh n + rh (non-negative, < 2^32); 2^31 = shift_q n + shift_r
  const uint64_t u = static_cast<uint64_t>(hi + (int64_t(1) << 31));
  const uint64_t qh = div_magic(u, p.magic_n);
  int64_t q_hi = static_cast<int64_t>(qh) - static_cast<int64_t>(p.shift_q);
  int64_t r_hi = static_cast<int64_t>(u - qh * n) - static_cast<int64_t>(p.shift_r);
  if (r_hi < 0) {
    r_hi += static_cast<int64_t>(n);
    --q_hi;
  }
  const uint64_t t = (static_cast<uint64_t>(r_hi) << 32) | lo;  // < n 2^32 <= 2^48
  const uint64_t q_lo = div_magic(t, p.magic_n);
  *r = t - q_lo * n;
  return static_cast<int64_t>(static_cast<uint64_t>(q_hi) << 32) + static_cast<int64_t>(q_lo);
}

// Float view of a fixed-point value: (double) x * 2^-radix, then one rounding to scalar_t (half
// types via float, as their constructors take float).
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t view_value(int64_t x, double inv_scale) {
  const double d = mul_rn(to_double(x), inv_scale);
  if constexpr (std::is_same_v<scalar_t, double>) {
    return d;
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    return static_cast<float>(d);
  } else {
    return static_cast<scalar_t>(static_cast<float>(d));
  }
}

// --- the per-element stack ----------------------------------------------------------------------

// One element's stack: word k lives at col[k * stride]. The count is read only when a word is
// written or read (rare: about every 32 / -log2(gamma) steps), which saves its memory traffic. A word
// spilled by an op is held back until the op ends (flush): once the head has outgrown 2^48, most steps
// spill a word and refill it at once, and then neither the word nor the count is touched.
struct Stack {
  uint32_t* col;
  int64_t stride;
  int64_t capacity;
  uint64_t head;
  const int32_t* count_ptr;
  int32_t count = 0;
  int32_t loaded_count = 0;
  bool loaded = false;
  bool has_pending = false;  // a word spilled in this op and not yet written
  uint32_t pending = 0;
  uint64_t flags = 0;

  C10_HOST_DEVICE Stack(uint32_t* col_, int64_t stride_, int64_t capacity_, uint64_t head_,
                        const int32_t* count_ptr_)
      : col(col_), stride(stride_), capacity(capacity_), head(head_), count_ptr(count_ptr_) {}

  C10_HOST_DEVICE inline void load() {
    if (!loaded) {
      count = loaded_count = *count_ptr;
      loaded = true;
    }
  }

  // Writes the count back when it changed; returns it then (for the caller's max), else 0.
  C10_HOST_DEVICE inline int32_t commit_count(int32_t* out) const {
    if (loaded && count != loaded_count) {
      *out = count;
      return count;
    }
    return 0;
  }

  // Writes the held-back word (once the op is done, before its flags are read).
  C10_HOST_DEVICE inline void flush() {
    if (!has_pending) return;
    load();
    if (count >= capacity) {
      flags |= kStackFull;
      return;
    }
    col[count * stride] = pending;
    ++count;
    has_pending = false;
  }

  C10_HOST_DEVICE inline void spill() {
    flush();  // (an op spills at most once; kept for generality)
    pending = static_cast<uint32_t>(head);
    has_pending = true;
    head >>= 32;
  }

  C10_HOST_DEVICE inline void refill() {
    if (has_pending) {  // the word this op spilled: no memory access
      head = (head << 32) | static_cast<uint64_t>(pending);
      has_pending = false;
      return;
    }
    load();
    if (count <= 0) {
      flags |= kStackEmpty;
      return;
    }
    --count;
    head = (head << 32) | static_cast<uint64_t>(col[count * stride]);
  }

  // push r in [0, 2^16) with the uniform distribution over 2^16 symbols
  C10_HOST_DEVICE inline void push_den(uint64_t r) {
    if (head >= (uint64_t(1) << 48)) spill();
    head = (head << kDenBits) | r;
  }

  C10_HOST_DEVICE inline uint64_t pop_den() {
    const uint64_t r = head & static_cast<uint64_t>(kDen - 1);
    head >>= kDenBits;
    if (head < kHeadLow) refill();
    return r;
  }

  // Frequency and cumulative count of symbol s of the near-uniform distribution over n (n >= 2).
  C10_HOST_DEVICE static inline void symbol(const Params& p, uint64_t s, uint64_t* f, uint64_t* c) {
    if (s < p.rem) {
      *f = static_cast<uint64_t>(p.q) + 1;
      *c = s * *f;
    } else {
      *f = p.q;
      *c = p.boundary + (s - p.rem) * static_cast<uint64_t>(p.q);
    }
  }

  // pop a symbol in [0, n): rANS decode, state interval [2^32, 2^64), 32-bit words.
  C10_HOST_DEVICE inline uint64_t pop_n(const Params& p) {
    if (p.n == 1) return 0;
    const uint64_t slot = head & 0xffffffffull;
    // branch-free choice of the symbol's class (a data-dependent branch here is a coin flip)
    const bool big = slot < p.boundary;
    const uint64_t f = static_cast<uint64_t>(p.q) + (big ? 1 : 0);
    const uint64_t base = big ? 0 : p.boundary;
    const uint64_t first = big ? 0 : p.rem;
    const uint64_t off = slot - base;
    const uint64_t k = div_magic(off, big ? p.magic_q1 : p.magic_q);
    const uint64_t within = off - k * f;
    const uint64_t s = first + k;
    head = f * (head >> 32) + within;
    if (head < kHeadLow) refill();
    return s;
  }

  // push s in [0, n): the exact inverse of pop_n.
  C10_HOST_DEVICE inline void push_n(const Params& p, uint64_t s) {
    if (p.n == 1) return;
    uint64_t f, c;
    symbol(p, s, &f, &c);
    if (head >= (f << 32)) spill();
    uint64_t r;
    const uint64_t q = udiv(head, f, s < p.rem ? p.inv_q1 : p.inv_q, &r);
    head = (q << 32) + r + c;
  }
};

// v <- gamma v exactly, the destroyed bits going into the stack.
C10_HOST_DEVICE inline int64_t gamma_forward(int64_t v, const Params& p, Stack& st) {
  if (p.n == kDen) return v;
  const uint64_t r = static_cast<uint64_t>(v) & static_cast<uint64_t>(kDen - 1);
  const int64_t q = v >> kDenBits;  // arithmetic shift: floor division (C++20)
  st.push_den(r);
  const uint64_t s = st.pop_n(p);
  return q * p.n + static_cast<int64_t>(s);  // |q * n| < |v|, no overflow
}

// Inverse of gamma_forward.
C10_HOST_DEVICE inline int64_t gamma_reverse(int64_t w, const Params& p, Stack& st, bool* ok) {
  if (p.n == kDen) return w;
  uint64_t s = 0;
  const int64_t q = p.n == 1 ? w : floordiv(w, p, &s);
  st.push_n(p, s);
  const uint64_t r = st.pop_den();
  if (q > (INT64_MAX >> kDenBits) || q < (INT64_MIN >> kDenBits)) {
    *ok = false;
    return w;
  }
  return static_cast<int64_t>(static_cast<uint64_t>(q) << kDenBits) + static_cast<int64_t>(r);
}

// Fixed-point value of (1 - gamma) g.
C10_HOST_DEVICE inline int64_t grad_term(double g, const Params& p, bool* ok) {
  return to_fixed(mul_rn(mul_rn(p.one_minus_gamma, g), p.scale), ok);
}

// --- one element of each op ---------------------------------------------------------------------

// Forward step: v <- gamma v - (1 - gamma) g;  x <- x + alpha v;  view <- x.
// Commits only when nothing went wrong; returns the flags of this element. *new_count is set to the
// stack count when it changed (else left alone), for the caller's running maximum.
template <typename scalar_t>
C10_HOST_DEVICE inline uint64_t step_element(int64_t* x, int64_t* v, uint64_t* head, int32_t* count,
                                              uint32_t* col, int64_t stride, int64_t capacity,
                                              scalar_t* view, scalar_t grad, const Params& p,
                                              int32_t* new_count) {
  const double g = static_cast<double>(grad);
  if (!finite(g)) return kNonFinite;
  bool ok = true;
  const int64_t delta = grad_term(g, p, &ok);
  Stack st(col, stride, capacity, *head, count);
  const int64_t w = gamma_forward(*v, p, st);
  const int64_t v_new = sub_checked(w, delta, &ok);
  const int64_t step = to_fixed(mul_rn(p.lr, to_double(v_new)), &ok);
  const int64_t x_new = add_checked(*x, step, &ok);
  st.flush();
  if (!ok) st.flags |= kOverflow;
  if (st.flags) return st.flags;
  *x = x_new;
  *v = v_new;
  *head = st.head;
  if (const int32_t c = st.commit_count(count)) *new_count = c;
  *view = view_value<scalar_t>(x_new, p.inv_scale);
  return 0;
}

// Reverse of the weight update: x <- x - alpha v; view <- x. Returns flags.
template <typename scalar_t>
C10_HOST_DEVICE inline uint64_t unstep_weights_element(int64_t* x, int64_t v, scalar_t* view,
                                                        const Params& p) {
  bool ok = true;
  const int64_t step = to_fixed(mul_rn(p.lr, to_double(v)), &ok);
  const int64_t x_new = sub_checked(*x, step, &ok);
  if (!ok) return kOverflow;
  *x = x_new;
  *view = view_value<scalar_t>(x_new, p.inv_scale);
  return 0;
}

// Reverse of the velocity update: v <- (v + (1 - gamma) g) / gamma exactly. Returns flags; *new_count
// as in step_element.
C10_HOST_DEVICE inline uint64_t unstep_velocity_element(int64_t* v, uint64_t* head, int32_t* count,
                                                        uint32_t* col, int64_t stride, int64_t capacity,
                                                        double g, const Params& p, int32_t* new_count) {
  if (!finite(g)) return kNonFinite;
  bool ok = true;
  const int64_t delta = grad_term(g, p, &ok);
  const int64_t w = add_checked(*v, delta, &ok);
  Stack st(col, stride, capacity, *head, count);
  const int64_t v_old = gamma_reverse(w, p, st, &ok);
  st.flush();
  if (!ok) st.flags |= kOverflow;
  if (st.flags) return st.flags;
  *v = v_old;
  *head = st.head;
  if (const int32_t c = st.commit_count(count)) *new_count = c;
  return 0;
}

}  // namespace rev
}  // namespace stn_ext
