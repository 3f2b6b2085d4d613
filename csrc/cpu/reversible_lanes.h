// The CPU's vector path of the reversible step and of its two reverse ops (x86 with AVX2, chosen at run time):
// the common case of rev::step_element (and of rev::unstep_weights_element, rev::unstep_velocity_element
// below), four elements at a time in one loop of AVX2 intrinsics. The scalar loop was latency-bound
// at ~12 ns per element (64-bit divisions by magic numbers, int64 <-> double conversions), and GCC's own
// vectorisation of it turned every 32 x 32 -> 64 product into a full 64-bit one and spilled most registers.
//
// The common case: no word written to or read from the stack (the head stays below 2^48 before the push
// and at or above 2^32 after the pop, or the op spills a word and refills the same word at once, which
// Stack's held-back word makes a no-op on memory), every value before a rounding below 2^51 in magnitude,
// no overflow, a finite gradient. An element outside it is left untouched and marked; the caller runs
// rev::step_element on it (about one element in 200 per step at momentum 0.9, where a stack grows by a
// word). Each operation below gives the value its step_element counterpart gives there, so the bits are
// the same: the tests compare this path with the emulated CUDA kernels (which run step_element) and with
// the Python reference, bit for bit.
//
// Identities used (all exact in the ranges named):
//   round-to-nearest-even(y) for |y| < 2^51:  bits(y + 1.5 2^52) - bits(1.5 2^52)            (to_fixed)
//   (double) a for |a| < 2^51:                double(bits(a + bits(1.5 2^52))) - 1.5 2^52   (to_double)
//   (double) a for any int64 a:               (double)(int32)(a >> 32) * 2^32 + (double)(uint32) a, one
//                                             rounding, as cvtsi2sd (the view of x)
//   floor(a magic / 2^64) for a < 2^32:       (hi(magic) a + (lo(magic) a >> 32)) >> 32   (div_magic)
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define STN_EXT_LANES 1

#include <immintrin.h>

#include <type_traits>

#include "reversible_math.h"

namespace stn_ext {
namespace lanes {

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

// What reversible_lanes_avx512.h needs: F, DQ (64-bit products, int64 <-> double), BW, VL.
inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return has;
}

#define STN_AVX2 __attribute__((target("avx2")))

STN_AVX2 inline __m256i splat(uint64_t a) { return _mm256_set1_epi64x(static_cast<int64_t>(a)); }

// 4 gradients as doubles.
STN_AVX2 inline __m256d load_grad(const float* g) { return _mm256_cvtps_pd(_mm_loadu_ps(g)); }
STN_AVX2 inline __m256d load_grad(const double* g) { return _mm256_loadu_pd(g); }

// The view: 4 values rounded to scalar_t, where keep is all ones the old value kept.
STN_AVX2 inline void store_view(float* y, __m256d value, __m256i keep) {
  const __m128i keep32 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(keep, _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0)));
  _mm_storeu_ps(y, _mm_blendv_ps(_mm256_cvtpd_ps(value), _mm_loadu_ps(y), _mm_castsi128_ps(keep32)));
}
STN_AVX2 inline void store_view(double* y, __m256d value, __m256i keep) {
  _mm256_storeu_pd(y, _mm256_blendv_pd(value, _mm256_loadu_pd(y), _mm256_castsi256_pd(keep)));
}

// The constants of the three AVX2 loops (the fixed ones and one call's Params, broadcast) and the operations
// they share; a loop builds one in its registers and the compiler drops what it does not use.
struct Avx2Constants {
  __m256i zero, ones, low16, low32, sign16, round_bits, small_bias, two52_bits, odd;
  __m256d round_magic, limit, abs_mask, two52, two32;
  __m256i boundary, rem, q, q1, n, mq_lo, mq_hi, mq1_lo, mq1_hi;
  __m256d omg, scale, lr, inv_scale, inv_n, inv_q, inv_q1;

  STN_AVX2 explicit Avx2Constants(const rev::Params& p)
      : zero(_mm256_setzero_si256()),
        ones(_mm256_set1_epi64x(-1)),
        low16(splat(rev::kDen - 1)),
        low32(splat(0xffffffffull)),
        sign16(splat(~uint64_t(0) << 48)),
        round_bits(splat(0x4338000000000000ull)),  // the bits of round_magic
        small_bias(splat(uint64_t(1) << 51)),
        two52_bits(splat(0x4330000000000000ull)),
        odd(_mm256_setr_epi32(1, 3, 5, 7, 0, 0, 0, 0)),
        round_magic(_mm256_set1_pd(6755399441055744.0)),  // 1.5 * 2^52
        limit(_mm256_set1_pd(2251799813685248.0)),        // 2^51
        abs_mask(_mm256_castsi256_pd(splat(~(uint64_t(1) << 63)))),
        two52(_mm256_set1_pd(4503599627370496.0)),
        two32(_mm256_set1_pd(4294967296.0)),
        boundary(splat(p.boundary)),
        rem(splat(p.rem)),
        q(splat(p.q)),
        q1(splat(uint64_t(p.q) + 1)),
        n(splat(p.n)),
        mq_lo(splat(p.magic_q & 0xffffffffull)),
        mq_hi(splat(p.magic_q >> 32)),
        mq1_lo(splat(p.magic_q1 & 0xffffffffull)),
        mq1_hi(splat(p.magic_q1 >> 32)),
        omg(_mm256_set1_pd(p.one_minus_gamma)),
        scale(_mm256_set1_pd(p.scale)),
        lr(_mm256_set1_pd(p.lr)),
        inv_scale(_mm256_set1_pd(p.inv_scale)),
        inv_n(_mm256_set1_pd(p.inv_n)),
        inv_q(_mm256_set1_pd(p.inv_q)),
        inv_q1(_mm256_set1_pd(p.inv_q1)) {}

  // all ones where |y| < 2^51 (none for NaN)
  STN_AVX2 __m256i small(__m256d y) const {
    return _mm256_castpd_si256(_mm256_cmp_pd(_mm256_and_pd(y, abs_mask), limit, _CMP_LT_OQ));
  }
  // all ones where |y| >= 2^51 or y is NaN
  STN_AVX2 __m256i not_small(__m256d y) const {
    return _mm256_castpd_si256(_mm256_cmp_pd(_mm256_and_pd(y, abs_mask), limit, _CMP_NLT_UQ));
  }
  // all ones where |a| < 2^51
  STN_AVX2 __m256i small_int(__m256i a) const {
    return _mm256_cmpeq_epi64(_mm256_srli_epi64(_mm256_add_epi64(a, small_bias), 52), zero);
  }
  // round-to-nearest-even for |y| < 2^51
  STN_AVX2 __m256i to_fixed(__m256d y) const {
    return _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(y, round_magic)), round_bits);
  }
  // (double) a for |a| < 2^51
  STN_AVX2 __m256d to_double(__m256i a) const {
    return _mm256_sub_pd(_mm256_castsi256_pd(_mm256_add_epi64(a, round_bits)), round_magic);
  }
  // (double) a for 0 <= a < 2^32, exact
  STN_AVX2 __m256d u32_to_double(__m256i a) const {
    return _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(a, two52_bits)), two52);
  }
  // the view: (double) a * 2^-radix for any int64 a (its high half exact, its low half exact, one rounding)
  STN_AVX2 __m256d view_value(__m256i a) const {
    const __m256d hi = _mm256_mul_pd(
        _mm256_cvtepi32_pd(_mm256_castsi256_si128(_mm256_permutevar8x32_epi32(a, odd))), two32);
    return _mm256_mul_pd(_mm256_add_pd(hi, u32_to_double(_mm256_and_si256(a, low32))), inv_scale);
  }
  // a n mod 2^64 from 32-bit products (n < 2^32)
  STN_AVX2 __m256i mul_n(__m256i a) const {
    return _mm256_add_epi64(_mm256_mul_epu32(a, n), _mm256_slli_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), n), 32));
  }
  // all ones where a + b overflowed into r (the sign test of add_checked / sub_checked)
  STN_AVX2 __m256i overflowed(__m256i a, __m256i b, __m256i r) const {
    return _mm256_cmpgt_epi64(zero, _mm256_and_si256(_mm256_xor_si256(a, r), _mm256_xor_si256(b, r)));
  }
};

// Steps elements [0, len) that are in the common case; outside[i] is all ones for the others (and for the
// last len mod 4, left to step_element too). Returns whether there are any.
template <typename scalar_t>
STN_AVX2 bool step(int64_t* __restrict x, int64_t* __restrict v, uint64_t* __restrict head, scalar_t* __restrict view,
                   const scalar_t* __restrict grad, uint64_t* __restrict outside, int64_t len, const rev::Params& p) {
  const Avx2Constants c(p);
  __m256i any = c.zero;
  int64_t i = 0;
  for (; i + 4 <= len; i += 4) {
    const __m256i vv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i));
    const __m256i hd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(head + i));
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    // delta = (1 - gamma) g in fixed point (grad_term)
    const __m256d y1 = _mm256_mul_pd(_mm256_mul_pd(c.omg, load_grad(grad + i)), c.scale);
    __m256i bad = c.not_small(y1);
    const __m256i delta = c.to_fixed(y1);
    // gamma_forward: push_den(v mod 2^16), after a spill of the low word where head >= 2^48
    const __m256i no_spill = _mm256_cmpeq_epi64(_mm256_srli_epi64(hd, 48), c.zero);
    const __m256i hs = _mm256_blendv_epi8(_mm256_srli_epi64(hd, 32), hd, no_spill);
    const __m256i h = _mm256_or_si256(_mm256_slli_epi64(hs, rev::kDenBits), _mm256_and_si256(vv, c.low16));
    // pop_n: the symbol's class (slot < boundary: frequency q + 1), its index k and the new head
    const __m256i slot = _mm256_and_si256(h, c.low32);
    const __m256i big = _mm256_cmpgt_epi64(c.boundary, slot);
    const __m256i f = _mm256_sub_epi64(c.q, big);
    const __m256i off = _mm256_sub_epi64(slot, _mm256_andnot_si256(big, c.boundary));
    const __m256i m_lo = _mm256_blendv_epi8(c.mq_lo, c.mq1_lo, big), m_hi = _mm256_blendv_epi8(c.mq_hi, c.mq1_hi, big);
    const __m256i k = _mm256_srli_epi64(
        _mm256_add_epi64(_mm256_mul_epu32(m_hi, off), _mm256_srli_epi64(_mm256_mul_epu32(m_lo, off), 32)), 32);
    const __m256i within = _mm256_sub_epi64(off, _mm256_mul_epu32(k, f));
    const __m256i h2 = _mm256_add_epi64(_mm256_mul_epu32(f, _mm256_srli_epi64(h, 32)), within);
    // a refill where the head fell below 2^32 takes back the low word the spill took off
    const __m256i refill = _mm256_cmpeq_epi64(_mm256_srli_epi64(h2, 32), c.zero);
    const __m256i hn =
        _mm256_blendv_epi8(h2, _mm256_or_si256(_mm256_slli_epi64(h2, 32), _mm256_and_si256(hd, c.low32)), refill);
    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi64(refill, no_spill));  // a spill without a refill, or the reverse
    // w = floor(v / 2^16) n + s (AVX2 has no 64-bit arithmetic shift: the sign bits by hand); |q n| < 2^63
    const __m256i qv = _mm256_or_si256(_mm256_srli_epi64(vv, rev::kDenBits),
                                       _mm256_and_si256(_mm256_cmpgt_epi64(c.zero, vv), c.sign16));
    const __m256i w = _mm256_add_epi64(_mm256_add_epi64(c.mul_n(qv), _mm256_andnot_si256(big, c.rem)), k);
    // v_new = w - delta (sub_checked), |v_new| < 2^51 for its conversion
    const __m256i vn = _mm256_sub_epi64(w, delta);  // overflowed iff w = vn + delta did: (w ^ delta) & (w ^ vn) < 0
    bad = _mm256_or_si256(bad, c.overflowed(vn, delta, w));
    bad = _mm256_or_si256(bad, _mm256_xor_si256(c.small_int(vn), c.ones));
    // x_new = x + round(lr v_new) (add_checked)
    const __m256d y2 = _mm256_mul_pd(c.lr, c.to_double(vn));
    bad = _mm256_or_si256(bad, c.not_small(y2));
    const __m256i step = c.to_fixed(y2);
    const __m256i xn = _mm256_add_epi64(x0, step);
    bad = _mm256_or_si256(bad, c.overflowed(x0, step, xn));
    // the view: (double) x_new * 2^-radix, x_new of any size
    const __m256d value = c.view_value(xn);
    // commit where nothing went wrong; keep (all ones) the old state elsewhere
    const __m256i keep = bad;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + i), _mm256_blendv_epi8(xn, x0, keep));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(v + i), _mm256_blendv_epi8(vn, vv, keep));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(head + i), _mm256_blendv_epi8(hn, hd, keep));
    store_view(view + i, value, keep);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(outside + i), keep);
    any = _mm256_or_si256(any, keep);
  }
  for (; i < len; ++i) outside[i] = ~uint64_t(0);
  return len % 4 != 0 || !_mm256_testz_si256(any, any);
}

// The reverse ops' common case, four elements at a time, as step above. Each operation gives the value its
// rev::unstep_weights_element / rev::unstep_velocity_element counterpart gives there (the tests compare the
// reversal with the emulated CUDA kernels and the Python reference bit for bit); an element outside the
// common case is left untouched for the caller's scalar path. done[j] has bit l set where element 4 j + l
// was done (the last len mod 4 never are); returns whether any element of [0, len) was not.

// x <- x - round(lr v); view <- x. Common case: |v| < 2^51, |lr v| < 2^51, no overflow.
template <typename scalar_t>
STN_AVX2 bool unstep_weights(int64_t* __restrict x, const int64_t* __restrict v, scalar_t* __restrict view,
                             uint8_t* __restrict done, int64_t len, const rev::Params& p) {
  const Avx2Constants c(p);
  int all = 0xf;
  int64_t i = 0;
  for (; i + 4 <= len; i += 4) {
    const __m256i vv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i));
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    // |v| < 2^51 for its conversion (to_double), then round(lr v) for |lr v| < 2^51 (to_fixed)
    __m256i good = c.small_int(vv);
    const __m256d y = _mm256_mul_pd(c.lr, c.to_double(vv));
    good = _mm256_and_si256(good, c.small(y));
    const __m256i step = c.to_fixed(y);
    // x_new = x - step (sub_checked): overflowed iff (x ^ step) & (x ^ x_new) < 0
    const __m256i xn = _mm256_sub_epi64(x0, step);
    good = _mm256_andnot_si256(_mm256_and_si256(_mm256_xor_si256(x0, step), _mm256_xor_si256(x0, xn)), good);
    // the view: (double) x_new * 2^-radix, x_new of any size
    const __m256d value = c.view_value(xn);
    // good's sign bits are the verdicts (the overflow test left only them meaningful)
    const __m256i keep = _mm256_cmpgt_epi64(c.zero, good);  // all ones where done
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + i), _mm256_blendv_epi8(x0, xn, keep));
    store_view(view + i, value, _mm256_cmpeq_epi64(keep, c.zero));
    const int m = _mm256_movemask_pd(_mm256_castsi256_pd(keep));
    done[i / 4] = static_cast<uint8_t>(m);
    all &= m;
  }
  return len % 4 != 0 || all != 0xf;
}

// v <- (v + (1 - gamma) g) / gamma exactly (gamma_reverse: push(w mod n, n), then floor(w / n) 2^16 + pop(2^16)),
// for 16 <= n < 2^16. Common case: a finite gradient with |(1 - gamma) g 2^radix| < 2^51, |w| < 2^51 for
// w = v + delta (which also rules out a wrapped sum, and with n >= 16 puts floor(w / n) in the range where
// floor(w / n) 2^16 fits), and no word written or read (no spill and no refill, or a spill refilled at once).
// The two divisions take a first guess from a double reciprocal and correct it once (as rev::udiv):
//   floor(w / n):              q0 = round(w (1/n)) is floor or floor + 1 (error < 1/4 for |w / n| < 2^47)
//   floor(h / f), h < f 2^32:  h as hi 2^32 + lo (one rounding), q0 = round(h (1/f)) is floor or floor + 1
//                              (relative error < 2^-51, quotient < 2^32); q0 = 2^32 (its product with f
//                              taken from the low 32 bits) leaves a remainder >= f, sent to the scalar path.
template <typename scalar_t>
STN_AVX2 bool unstep_velocity(int64_t* __restrict v, uint64_t* __restrict head, const scalar_t* __restrict grad,
                              uint8_t* __restrict done, int64_t len, const rev::Params& p) {
  const Avx2Constants c(p);
  int all = 0xf;
  int64_t i = 0;
  for (; i + 4 <= len; i += 4) {
    const __m256i vv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i));
    const __m256i hd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(head + i));
    // delta = (1 - gamma) g in fixed point (grad_term), |y1| < 2^51 (false for NaN); w = v + delta, |w| < 2^51
    const __m256d y1 = _mm256_mul_pd(_mm256_mul_pd(c.omg, load_grad(grad + i)), c.scale);
    __m256i good = c.small(y1);
    const __m256i w = _mm256_add_epi64(vv, c.to_fixed(y1));
    good = _mm256_and_si256(good, c.small_int(w));
    // floordiv: qf = floor(w / n), s = w mod n; q0 n mod 2^64 from 32-bit products (n < 2^16)
    const __m256i q0 = c.to_fixed(_mm256_mul_pd(c.to_double(w), c.inv_n));
    const __m256i r0 = _mm256_sub_epi64(w, c.mul_n(q0));
    const __m256i neg = _mm256_cmpgt_epi64(c.zero, r0);
    const __m256i qf = _mm256_add_epi64(q0, neg);
    const __m256i s = _mm256_add_epi64(r0, _mm256_and_si256(neg, c.n));
    // push_n(s): frequency f and cumulative count cs of s (big: s < rem, frequency q + 1)
    const __m256i big = _mm256_cmpgt_epi64(c.rem, s);
    const __m256i f = _mm256_sub_epi64(c.q, big);
    const __m256i cs = _mm256_blendv_epi8(_mm256_add_epi64(c.boundary, _mm256_mul_epu32(_mm256_sub_epi64(s, c.rem), c.q)),
                                          _mm256_mul_epu32(s, c.q1), big);
    // a spill of the low word where head >= f 2^32
    const __m256i hh = _mm256_srli_epi64(hd, 32);
    const __m256i no_spill = _mm256_cmpgt_epi64(f, hh);
    const __m256i hs = _mm256_blendv_epi8(hh, hd, no_spill);
    // head = floor(hs / f) 2^32 + hs mod f + cs
    const __m256d hsd = _mm256_add_pd(_mm256_mul_pd(c.u32_to_double(_mm256_srli_epi64(hs, 32)), c.two32),
                                      c.u32_to_double(_mm256_and_si256(hs, c.low32)));
    const __m256i k0 = c.to_fixed(_mm256_mul_pd(hsd, _mm256_blendv_pd(c.inv_q, c.inv_q1, _mm256_castsi256_pd(big))));
    const __m256i rh0 = _mm256_sub_epi64(hs, _mm256_mul_epu32(k0, f));
    const __m256i negh = _mm256_cmpgt_epi64(c.zero, rh0);
    const __m256i k = _mm256_add_epi64(k0, negh);
    const __m256i rh = _mm256_add_epi64(rh0, _mm256_and_si256(negh, f));
    good = _mm256_and_si256(good, _mm256_cmpgt_epi64(f, rh));
    const __m256i hp = _mm256_add_epi64(_mm256_slli_epi64(k, 32), _mm256_add_epi64(rh, cs));
    // pop_den: the low 16 bits; a refill where the head fell below 2^32 takes back the word the spill took
    const __m256i r16 = _mm256_and_si256(hp, c.low16);
    const __m256i h2 = _mm256_srli_epi64(hp, rev::kDenBits);
    const __m256i refill = _mm256_cmpeq_epi64(_mm256_srli_epi64(h2, 32), c.zero);
    const __m256i hn =
        _mm256_blendv_epi8(h2, _mm256_or_si256(_mm256_slli_epi64(h2, 32), _mm256_and_si256(hd, c.low32)), refill);
    good = _mm256_andnot_si256(_mm256_cmpeq_epi64(refill, no_spill), good);  // a spill without a refill, or the reverse
    const __m256i vo = _mm256_add_epi64(_mm256_slli_epi64(qf, rev::kDenBits), r16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(v + i), _mm256_blendv_epi8(vv, vo, good));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(head + i), _mm256_blendv_epi8(hd, hn, good));
    const int m = _mm256_movemask_pd(_mm256_castsi256_pd(good));
    done[i / 4] = static_cast<uint8_t>(m);
    all &= m;
  }
  return len % 4 != 0 || all != 0xf;
}

#undef STN_AVX2

}  // namespace lanes
}  // namespace stn_ext

#else
#define STN_EXT_LANES 0

namespace stn_ext {
namespace lanes {
inline bool cpu_has_avx2() { return false; }
inline bool cpu_has_avx512() { return false; }
}  // namespace lanes
}  // namespace stn_ext
#endif
