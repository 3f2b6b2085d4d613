// The reverse ops' common case on AVX-512 (F, DQ, BW, VL; chosen at run time), eight elements at a time: the
// same contract as lanes::unstep_weights / lanes::unstep_velocity (reversible_lanes.h), with the instructions
// AVX2 lacks. Native int64 <-> double conversions (vcvtqq2pd, vcvtpd2qq) round as the scalar cvtsi2sd /
// cvtsd2si of rev::to_double / rev::to_fixed do (both under MXCSR's mode), so the view and the fixed-point
// products need no range limit beyond the scalar one; vpmullq gives 64-bit products; comparisons write mask
// registers, which take the place of blends and make the verdicts. Every value is the one the scalar
// element function gives (the tests force each path and compare with the scalar one and with the emulated
// CUDA kernels, bit for bit); elements outside the common case are left untouched and marked for the caller.
#pragma once

#include "reversible_lanes.h"

#if STN_EXT_LANES

namespace stn_ext {
namespace lanes {
namespace avx512 {

#define STN_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))

// GCC 12's AVX-512 intrinsics self-initialise their undefined operands (GCC bug 105593), which -Wall reports.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

STN_AVX512 inline __m512i splat(uint64_t a) { return _mm512_set1_epi64(static_cast<int64_t>(a)); }

// 8 gradients as doubles.
STN_AVX512 inline __m512d load_grad(const float* g) { return _mm512_cvtps_pd(_mm256_loadu_ps(g)); }
STN_AVX512 inline __m512d load_grad(const double* g) { return _mm512_loadu_pd(g); }

// The view: 8 values rounded to scalar_t (MXCSR's mode, as the scalar cast), written where done.
STN_AVX512 inline void store_view(float* y, __m512d value, __mmask8 done) {
  _mm256_mask_storeu_ps(y, done, _mm512_cvtpd_ps(value));
}
STN_AVX512 inline void store_view(double* y, __m512d value, __mmask8 done) { _mm512_mask_storeu_pd(y, done, value); }

// An operand the compiler cannot see into. Under target("avx512f") GCC fuses _mm512_add_pd(_mm512_mul_pd(a, b),
// c) into one FMA (one rounding instead of the scalar maths' two); an opaque product is never fused. (The step
// loops below add no product to anything; the adjoint terms do.)
STN_AVX512 inline __m512d opaque(__m512d a) {
  asm("" : "+v"(a));
  return a;
}

// Loads 8 values of scalar_t as doubles; stores 8 doubles rounded to scalar_t and returns what was stored, as a
// double.
STN_AVX512 inline __m512d load_double(const float* a) { return _mm512_cvtps_pd(_mm256_loadu_ps(a)); }
STN_AVX512 inline __m512d load_double(const double* a) { return _mm512_loadu_pd(a); }
STN_AVX512 inline __m512d store_rounded(float* a, __m512d d) {
  const __m256 f = _mm512_cvtpd_ps(d);
  _mm256_storeu_ps(a, f);
  return _mm512_cvtps_pd(f);
}
STN_AVX512 inline __m512d store_rounded(double* a, __m512d d) {
  _mm512_storeu_pd(a, d);
  return d;
}

// The terms of the reverse ops' adjoint sums, eight at a time, for the caller to add up in element order; each
// is the value the scalar loop computes (reversible_cpu.cpp). Both do the first len - len mod 8 elements and
// return how many they did.
//   unstep_weights:  term[i] = dx[i] (v[i] 2^-radix)
//   unstep_velocity: dv[i] <- dv[i] + lr dx[i] (rounded to scalar_t, without dx: unchanged),
//                    term[i] = dv[i] (v[i] 2^-radix + g[i])
template <typename scalar_t>
STN_AVX512 int64_t weights_terms(const scalar_t* __restrict dx, const int64_t* __restrict v, double* __restrict term,
                                 int64_t len, const rev::Params& p) {
  const __m512d inv_scale = _mm512_set1_pd(p.inv_scale);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m512d vd = _mm512_mul_pd(_mm512_cvtepi64_pd(_mm512_loadu_si512(v + i)), inv_scale);
    _mm512_storeu_pd(term + i, _mm512_mul_pd(load_double(dx + i), vd));
  }
  return i;
}

template <typename scalar_t>
STN_AVX512 int64_t velocity_terms(const scalar_t* __restrict g, const scalar_t* __restrict dx, scalar_t* __restrict dv,
                                  const int64_t* __restrict v, double* __restrict term, int64_t len, double lr_,
                                  const rev::Params& p) {
  const __m512d inv_scale = _mm512_set1_pd(p.inv_scale), lr = _mm512_set1_pd(lr_);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    __m512d d = load_double(dv + i);
    if (dx) d = store_rounded(dv + i, _mm512_add_pd(d, opaque(_mm512_mul_pd(lr, load_double(dx + i)))));
    const __m512d vd = opaque(_mm512_mul_pd(_mm512_cvtepi64_pd(_mm512_loadu_si512(v + i)), inv_scale));
    _mm512_storeu_pd(term + i, _mm512_mul_pd(d, _mm512_add_pd(vd, load_double(g + i))));
  }
  return i;
}

// Marks elements [i, i + 8) in done (a byte per 4 elements, as the AVX2 loops write it).
inline void mark(uint8_t* done, int64_t i, unsigned m) {
  done[i / 4] = static_cast<uint8_t>(m & 0xf);
  done[i / 4 + 1] = static_cast<uint8_t>(m >> 4);
}

// Groups of 4 after the last whole group of 8: marked not done, for the caller's scalar path.
inline bool finish(uint8_t* done, int64_t i, int64_t len, unsigned all) {
  for (; i + 4 <= len; i += 4) done[i / 4] = 0;
  return len % 8 != 0 || all != 0xff;
}

// The forward step's common case (lanes::step's contract: outside[i] all ones for the elements left to
// rev::step_element, and for the last len mod 8), with the ranges of the scalar conversions: |(1 - gamma) g
// 2^radix| < 2^63 and |lr v_new| < 2^63, v_new and x_new of any size; no word written or read.
template <typename scalar_t>
STN_AVX512 bool step(int64_t* __restrict x, int64_t* __restrict v, uint64_t* __restrict head,
                     scalar_t* __restrict view, const scalar_t* __restrict grad, uint64_t* __restrict outside,
                     int64_t len, const rev::Params& p) {
  const __m512i low16 = splat(rev::kDen - 1), low32 = splat(0xffffffffull);
  const __m512i spill_start = splat(uint64_t(1) << 48), boundary = splat(p.boundary), rem = splat(p.rem);
  const __m512i q = splat(p.q), n = splat(p.n), one = splat(1);
  const __m512i mq_lo = splat(p.magic_q & 0xffffffffull), mq_hi = splat(p.magic_q >> 32);
  const __m512i mq1_lo = splat(p.magic_q1 & 0xffffffffull), mq1_hi = splat(p.magic_q1 >> 32);
  const __m512d two63 = _mm512_set1_pd(rev::kTwo63);
  const __m512d omg = _mm512_set1_pd(p.one_minus_gamma), scale = _mm512_set1_pd(p.scale);
  const __m512d lr = _mm512_set1_pd(p.lr), inv_scale = _mm512_set1_pd(p.inv_scale);
  unsigned all = 0xff;
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m512i vv = _mm512_loadu_si512(v + i);
    const __m512i hd = _mm512_loadu_si512(head + i);
    const __m512i x0 = _mm512_loadu_si512(x + i);
    // delta = (1 - gamma) g in fixed point (grad_term); false for a non-finite gradient
    const __m512d y1 = _mm512_mul_pd(_mm512_mul_pd(omg, load_grad(grad + i)), scale);
    __mmask8 good = _mm512_cmp_pd_mask(_mm512_abs_pd(y1), two63, _CMP_LT_OQ);
    const __m512i delta = _mm512_cvtpd_epi64(y1);
    // gamma_forward: push_den(v mod 2^16), after a spill of the low word where head >= 2^48
    const __mmask8 spill = _mm512_cmpge_epu64_mask(hd, spill_start);
    const __m512i hs = _mm512_mask_srli_epi64(hd, spill, hd, 32);
    const __m512i h = _mm512_ternarylogic_epi64(_mm512_slli_epi64(hs, rev::kDenBits), vv, low16, 0xd8);  // c ? b : a
    // pop_n: the symbol's class (slot < boundary: frequency q + 1), its index k and the new head
    const __m512i slot = _mm512_and_si512(h, low32);
    const __mmask8 big = _mm512_cmplt_epu64_mask(slot, boundary);
    const __m512i f = _mm512_mask_add_epi64(q, big, q, one);
    const __m512i off = _mm512_mask_sub_epi64(slot, _knot_mask8(big), slot, boundary);
    const __m512i m_lo = _mm512_mask_mov_epi64(mq_lo, big, mq1_lo), m_hi = _mm512_mask_mov_epi64(mq_hi, big, mq1_hi);
    const __m512i k = _mm512_srli_epi64(
        _mm512_add_epi64(_mm512_mul_epu32(m_hi, off), _mm512_srli_epi64(_mm512_mul_epu32(m_lo, off), 32)), 32);
    const __m512i within = _mm512_sub_epi64(off, _mm512_mul_epu32(k, f));
    const __m512i h2 = _mm512_add_epi64(_mm512_mul_epu32(f, _mm512_srli_epi64(h, 32)), within);
    // a refill where the head fell below 2^32 takes back the low word the spill took off
    const __mmask8 refill = _mm512_cmplt_epu64_mask(h2, _mm512_slli_epi64(one, 32));
    good = _kand_mask8(good, _kxnor_mask8(refill, spill));  // a spill without a refill, or the reverse: scalar
    const __m512i hn = _mm512_mask_mov_epi64(h2, refill, _mm512_mask_blend_epi32(0x5555, _mm512_slli_epi64(h2, 32), hd));
    // w = floor(v / 2^16) n + s, s = k (+ rem where not big); |floor(v / 2^16) n| < |v|
    const __m512i qk = _mm512_add_epi64(_mm512_mullo_epi64(_mm512_srai_epi64(vv, rev::kDenBits), n), k);
    const __m512i w = _mm512_mask_add_epi64(qk, _knot_mask8(big), qk, rem);
    // v_new = w - delta (sub_checked: overflowed iff (w ^ delta) & (w ^ v_new) < 0)
    const __m512i vn = _mm512_sub_epi64(w, delta);
    good = _kandn_mask8(_mm512_movepi64_mask(_mm512_ternarylogic_epi64(w, delta, vn, 0x18)), good);
    // x_new = x + round(lr v_new) (add_checked: overflowed iff (x_new ^ x) & (x_new ^ step) < 0)
    const __m512d y2 = _mm512_mul_pd(lr, _mm512_cvtepi64_pd(vn));
    good = _mm512_mask_cmp_pd_mask(good, _mm512_abs_pd(y2), two63, _CMP_LT_OQ);
    const __m512i stp = _mm512_cvtpd_epi64(y2);
    const __m512i xn = _mm512_add_epi64(x0, stp);
    good = _kandn_mask8(_mm512_movepi64_mask(_mm512_ternarylogic_epi64(xn, x0, stp, 0x18)), good);
    const __m512d value = _mm512_mul_pd(_mm512_cvtepi64_pd(xn), inv_scale);
    _mm512_mask_storeu_epi64(x + i, good, xn);
    _mm512_mask_storeu_epi64(v + i, good, vn);
    _mm512_mask_storeu_epi64(head + i, good, hn);
    store_view(view + i, value, good);
    _mm512_storeu_si512(outside + i, _mm512_movm_epi64(_knot_mask8(good)));
    all &= good;
  }
  for (; i < len; ++i) outside[i] = ~uint64_t(0);
  return len % 8 != 0 || all != 0xff;
}

// x <- x - round(lr v); view <- x. Common case: |lr v| < 2^63 (the scalar to_fixed's range) and no overflow
// of the subtraction; v of any size (vcvtqq2pd rounds as cvtsi2sd).
template <typename scalar_t>
STN_AVX512 bool unstep_weights(int64_t* __restrict x, const int64_t* __restrict v, scalar_t* __restrict view,
                               uint8_t* __restrict done, int64_t len, const rev::Params& p) {
  const __m512d lr = _mm512_set1_pd(p.lr), inv_scale = _mm512_set1_pd(p.inv_scale);
  const __m512d two63 = _mm512_set1_pd(rev::kTwo63);
  unsigned all = 0xff;
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m512i vv = _mm512_loadu_si512(v + i);
    const __m512i x0 = _mm512_loadu_si512(x + i);
    const __m512d y = _mm512_mul_pd(lr, _mm512_cvtepi64_pd(vv));
    __mmask8 good = _mm512_cmp_pd_mask(_mm512_abs_pd(y), two63, _CMP_LT_OQ);
    const __m512i step = _mm512_cvtpd_epi64(y);
    // x_new = x - step (sub_checked): overflowed iff (x ^ step) & (x ^ x_new) < 0
    const __m512i xn = _mm512_sub_epi64(x0, step);
    const __m512i ovf = _mm512_ternarylogic_epi64(x0, step, xn, 0x18);  // (a ^ b) & (a ^ c)
    good = _kandn_mask8(_mm512_movepi64_mask(ovf), good);
    const __m512d value = _mm512_mul_pd(_mm512_cvtepi64_pd(xn), inv_scale);
    _mm512_mask_storeu_epi64(x + i, good, xn);
    store_view(view + i, value, good);
    mark(done, i, good);
    all &= good;
  }
  return finish(done, i, len, all);
}

// v <- (v + (1 - gamma) g) / gamma exactly, for 16 <= n < 2^16; the common case of lanes::unstep_velocity
// (a finite gradient with |(1 - gamma) g 2^radix| < 2^51, |w| < 2^51 for w = v + delta, no word written or
// read), and the same two divisions: a first guess from a double reciprocal, rounded to nearest whatever
// MXCSR says, corrected once, the element sent to the scalar path where one correction is not enough.
template <typename scalar_t>
STN_AVX512 bool unstep_velocity(int64_t* __restrict v, uint64_t* __restrict head, const scalar_t* __restrict grad,
                                uint8_t* __restrict done, int64_t len, const rev::Params& p) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512i one = splat(1), low16 = splat(rev::kDen - 1);
  const __m512i rem = splat(p.rem), q = splat(p.q), n = splat(p.n);
  const __m512i small_bias = splat(uint64_t(1) << 51), small_end = splat(uint64_t(1) << 52);
  const __m512i refill_end = splat(uint64_t(1) << 48);
  const __m512d limit = _mm512_set1_pd(2251799813685248.0);  // 2^51
  const __m512d omg = _mm512_set1_pd(p.one_minus_gamma), scale = _mm512_set1_pd(p.scale);
  const __m512d inv_n = _mm512_set1_pd(p.inv_n), inv_q = _mm512_set1_pd(p.inv_q), inv_q1 = _mm512_set1_pd(p.inv_q1);
  unsigned all = 0xff;
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m512i vv = _mm512_loadu_si512(v + i);
    const __m512i hd = _mm512_loadu_si512(head + i);
    // delta = (1 - gamma) g in fixed point (grad_term: to_fixed under MXCSR's mode), |y1| < 2^51 (false for
    // NaN); w = v + delta with |w| < 2^51 (which rules out a wrapped sum)
    const __m512d y1 = _mm512_mul_pd(_mm512_mul_pd(omg, load_grad(grad + i)), scale);
    __mmask8 good = _mm512_cmp_pd_mask(_mm512_abs_pd(y1), limit, _CMP_LT_OQ);
    const __m512i w = _mm512_add_epi64(vv, _mm512_cvtpd_epi64(y1));
    good = _mm512_mask_cmplt_epu64_mask(good, _mm512_add_epi64(w, small_bias), small_end);
    // floordiv: qf = floor(w / n), s = w mod n, from q0 = round(w / n), floor or floor + 1
    const __m512i q0 = _mm512_cvt_roundpd_epi64(_mm512_mul_pd(_mm512_cvtepi64_pd(w), inv_n), kNearest);
    const __m512i r0 = _mm512_sub_epi64(w, _mm512_mullo_epi64(q0, n));
    const __mmask8 neg = _mm512_movepi64_mask(r0);
    const __m512i qf = _mm512_mask_sub_epi64(q0, neg, q0, one);
    const __m512i s = _mm512_mask_add_epi64(r0, neg, r0, n);
    // push_n(s): big where s < rem (frequency f = q + 1, cumulative count s f), else f = q and the count
    // boundary + (s - rem) q = s q + rem (boundary = rem (q + 1))
    const __mmask8 big = _mm512_cmplt_epu64_mask(s, rem);
    const __m512i f = _mm512_mask_add_epi64(q, big, q, one);
    const __m512i c = _mm512_mask_add_epi64(_mm512_mul_epu32(s, f), _knot_mask8(big), _mm512_mul_epu32(s, f), rem);
    // a spill of the low word where head >= f 2^32
    const __m512i hh = _mm512_srli_epi64(hd, 32);
    const __mmask8 spill = _mm512_cmpge_epu64_mask(hh, f);
    const __m512i hs = _mm512_mask_mov_epi64(hd, spill, hh);
    // head = floor(hs / f) 2^32 + hs mod f + c; hs < f 2^32, the quotient's guess k0 <= 2^32 (a guess of 2^32,
    // its product with f taken from the low 32 bits, leaves a remainder >= f: sent to the scalar path)
    const __m512d inv_f = _mm512_mask_mov_pd(inv_q, big, inv_q1);
    const __m512i k0 = _mm512_cvt_roundpd_epi64(_mm512_mul_pd(_mm512_cvtepu64_pd(hs), inv_f), kNearest);
    const __m512i rh0 = _mm512_sub_epi64(hs, _mm512_mul_epu32(k0, f));
    const __mmask8 negh = _mm512_movepi64_mask(rh0);
    const __m512i k = _mm512_mask_sub_epi64(k0, negh, k0, one);
    const __m512i rh = _mm512_mask_add_epi64(rh0, negh, rh0, f);
    good = _mm512_mask_cmplt_epu64_mask(good, rh, f);
    const __m512i hp = _mm512_add_epi64(_mm512_slli_epi64(k, 32), _mm512_add_epi64(rh, c));
    // pop_den: the low 16 bits; a refill where the head fell below 2^32 (hp < 2^48) takes back the word the
    // spill took (a spill without a refill, or the reverse, reads or writes the stack: scalar path)
    const __mmask8 refill = _mm512_cmplt_epu64_mask(hp, refill_end);
    good = _kand_mask8(good, _kxnor_mask8(refill, spill));
    const __m512i h2 = _mm512_srli_epi64(hp, rev::kDenBits);
    const __m512i hn = _mm512_mask_mov_epi64(h2, refill, _mm512_mask_blend_epi32(0x5555, _mm512_slli_epi64(h2, 32), hd));
    const __m512i vo = _mm512_ternarylogic_epi64(_mm512_slli_epi64(qf, rev::kDenBits), hp, low16, 0xd8);  // c ? b : a
    _mm512_mask_storeu_epi64(v + i, good, vo);
    _mm512_mask_storeu_epi64(head + i, good, hn);
    mark(done, i, good);
    all &= good;
  }
  return finish(done, i, len, all);
}

#pragma GCC diagnostic pop
#undef STN_AVX512

}  // namespace avx512
}  // namespace lanes
}  // namespace stn_ext

#endif
