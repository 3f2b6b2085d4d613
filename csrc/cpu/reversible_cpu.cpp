// CPU kernels of exact reversible SGD with momentum: at::parallel_for loops around the element maths of
// reversible_math.h. Elements are taken in fixed blocks, and the per-block partial results (flags,
// largest stack count, float64 partial sums) are combined in block order, so results do not depend on
// the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <type_traits>
#include <vector>

#include "reversible_checks.h"
#include "reversible_math.h"

namespace stn_ext {
namespace {

constexpr int64_t kBlock = 4096;

struct BlockResults {
  std::vector<uint64_t> flags;
  std::vector<int64_t> max_count;
  std::vector<double> sum;
  explicit BlockResults(int64_t blocks) : flags(blocks, 0), max_count(blocks, 0), sum(blocks, 0.0) {}

  // Folds the blocks into status (flags OR-ed, max count maxed) and returns the total sum.
  double finish(const at::Tensor& status) const {
    int64_t* st = status.mutable_data_ptr<int64_t>();
    uint64_t f = static_cast<uint64_t>(st[0]);
    int64_t m = st[1];
    double s = 0.0;
    for (size_t b = 0; b < flags.size(); ++b) {
      f |= flags[b];
      m = std::max(m, max_count[b]);
      s += sum[b];
    }
    st[0] = static_cast<int64_t>(f);
    st[1] = m;
    return s;
  }
};

// The vector path (reversible_math.h, step_lane) where the CPU has AVX2: compiled for it here, chosen at
// run time. Elsewhere every element takes step_element.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define STN_EXT_LANES 1
#include <immintrin.h>
bool cpu_has_lanes() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

// old where keep is all ones, new where it is zero; in bit operations (GCC does not vectorise a select
// between a loaded and a computed value).
template <typename T>
inline T keep_or(T old_value, T new_value, uint64_t keep) {
  using bits_t = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  const bits_t k = static_cast<bits_t>(keep);
  return std::bit_cast<T>(
      static_cast<bits_t>((std::bit_cast<bits_t>(old_value) & k) | (std::bit_cast<bits_t>(new_value) & ~k)));
}

// rev::velocity_lane four elements at a time: GCC vectorises its 32 x 32 -> 64 products as full 64-bit
// ones (three multiplies each), so they are spelled out here (one vpmuludq). The tail takes the scalar
// form; both give the same bits (the tests compare with the emulated CUDA kernels and the reference).
__attribute__((target("avx2"))) inline __m256i splat(uint64_t a) {
  return _mm256_set1_epi64x(static_cast<int64_t>(a));
}

__attribute__((target("avx2"))) void velocity_lanes(const int64_t* __restrict v, const uint64_t* __restrict head,
                                                    const int64_t* __restrict delta, uint64_t* __restrict out,
                                                    int64_t* __restrict v_new, uint64_t* __restrict head_new,
                                                    int64_t m, const rev::Params& p) {
  const __m256i zero = _mm256_setzero_si256(), low32 = splat(0xffffffffull), low16 = splat(rev::kDen - 1);
  const __m256i sign16 = splat(~uint64_t(0) << 48), boundary = splat(p.boundary), rem = splat(p.rem);
  const __m256i q = splat(p.q), n = splat(p.n);
  const __m256i mq_lo = splat(p.magic_q & 0xffffffffull), mq_hi = splat(p.magic_q >> 32);
  const __m256i mq1_lo = splat(p.magic_q1 & 0xffffffffull), mq1_hi = splat(p.magic_q1 >> 32);
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const __m256i vv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i));
    const __m256i hd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(head + i));
    const __m256i dl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(delta + i));
    // push_den(v mod 2^16), after a spill of the low word where head >= 2^48
    const __m256i no_spill = _mm256_cmpeq_epi64(_mm256_srli_epi64(hd, 48), zero);
    const __m256i hs = _mm256_blendv_epi8(_mm256_srli_epi64(hd, 32), hd, no_spill);
    const __m256i h = _mm256_or_si256(_mm256_slli_epi64(hs, rev::kDenBits), _mm256_and_si256(vv, low16));
    // pop_n
    const __m256i slot = _mm256_and_si256(h, low32);
    const __m256i big = _mm256_cmpgt_epi64(boundary, slot);  // all ones: a symbol of frequency q + 1
    const __m256i f = _mm256_sub_epi64(q, big);
    const __m256i off = _mm256_sub_epi64(slot, _mm256_andnot_si256(big, boundary));
    const __m256i m_lo = _mm256_blendv_epi8(mq_lo, mq1_lo, big), m_hi = _mm256_blendv_epi8(mq_hi, mq1_hi, big);
    const __m256i k = _mm256_srli_epi64(
        _mm256_add_epi64(_mm256_mul_epu32(m_hi, off), _mm256_srli_epi64(_mm256_mul_epu32(m_lo, off), 32)), 32);
    const __m256i within = _mm256_sub_epi64(off, _mm256_mul_epu32(k, f));
    const __m256i h2 = _mm256_add_epi64(_mm256_mul_epu32(f, _mm256_srli_epi64(h, 32)), within);
    // a refill where the head fell below 2^32: the low word the spill took off
    const __m256i refill = _mm256_cmpeq_epi64(_mm256_srli_epi64(h2, 32), zero);
    const __m256i hn = _mm256_blendv_epi8(h2, _mm256_or_si256(_mm256_slli_epi64(h2, 32), _mm256_and_si256(hd, low32)),
                                          refill);
    // w = floor(v / 2^16) n + s (the arithmetic shift by hand: AVX2 has none for 64-bit lanes)
    const __m256i qv = _mm256_or_si256(_mm256_srli_epi64(vv, rev::kDenBits),
                                       _mm256_and_si256(_mm256_cmpgt_epi64(zero, vv), sign16));
    const __m256i qn = _mm256_add_epi64(_mm256_mul_epu32(qv, n),
                                        _mm256_slli_epi64(_mm256_mul_epu32(_mm256_srli_epi64(qv, 32), n), 32));
    const __m256i w = _mm256_add_epi64(_mm256_add_epi64(qn, _mm256_andnot_si256(big, rem)), k);
    const __m256i vn = _mm256_sub_epi64(w, dl);
    // outside: a spill without a refill or the reverse (refill == no_spill), or an overflow of w - delta
    const __m256i ovf = _mm256_and_si256(_mm256_xor_si256(w, dl), _mm256_xor_si256(w, vn));
    const __m256i bad = _mm256_or_si256(_mm256_cmpeq_epi64(refill, no_spill), ovf);
    const __m256i o = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_or_si256(o, _mm256_srli_epi64(bad, 63)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(v_new + i), vn);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(head_new + i), hn);
  }
  for (; i < m; ++i) out[i] |= rev::velocity_lane(v[i], head[i], delta[i], p, &v_new[i], &head_new[i]);
}

// Steps every element of [0, len) (len <= kBlock) that is in the lanes' common case; marks the others in
// outside[] (left untouched, for step_element) and returns whether there are any. Sub-blocks of kLanes
// elements, three vectorised loops each, the pieces passing through small buffers that stay in L1.
constexpr int64_t kLanes = 512;

template <typename scalar_t>
__attribute__((target("avx2"))) bool step_lanes(int64_t* __restrict x, int64_t* __restrict v,
                                                uint64_t* __restrict head, scalar_t* __restrict view,
                                                const scalar_t* __restrict grad, uint64_t* __restrict outside,
                                                int64_t len, const rev::Params& params) {
  const rev::Params p = params;
  int64_t delta[kLanes], v_new[kLanes];
  uint64_t head_new[kLanes], out[kLanes];
  uint64_t any = 0;
  for (int64_t s = 0; s < len; s += kLanes) {
    const int64_t m = std::min(kLanes, len - s);
    for (int64_t i = 0; i < m; ++i) out[i] = rev::grad_lane(static_cast<double>(grad[s + i]), p, &delta[i]);
    velocity_lanes(v + s, head + s, delta, out, v_new, head_new, m, p);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t j = s + i;
      int64_t xn;
      double y;
      const uint64_t keep = uint64_t(0) - (out[i] | rev::weights_lane(x[j], v_new[i], p, &xn, &y));
      x[j] = keep_or(x[j], xn, keep);
      v[j] = keep_or(v[j], v_new[i], keep);
      head[j] = keep_or(head[j], head_new[i], keep);
      view[j] = keep_or(view[j], static_cast<scalar_t>(y), keep);
      outside[j] = keep;
      any |= keep;
    }
  }
  return any != 0;
}
#else
#define STN_EXT_LANES 0
#endif

template <typename F>
void for_blocks(int64_t n, const F& body) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) body(b, b * kBlock, std::min(n, (b + 1) * kBlock));
  });
}

void reversible_step_cpu(const at::Tensor& x, const at::Tensor& v, const at::Tensor& head,
                         const at::Tensor& count, const at::Tensor& words, const at::Tensor& view,
                         const at::Tensor& grad_in, const at::Tensor& status, double lr, int64_t gamma_num,
                         int64_t radix_bits) {
  const int64_t capacity = check_step(x, v, head, count, words, view, grad_in, status, c10::kCPU);
  const rev::Params p = check_scalars(lr, gamma_num, radix_bits);
  const auto grad = grad_in.contiguous();
  const int64_t n = view.numel();
  BlockResults res((n + kBlock - 1) / kBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, view.scalar_type(), "stn_ext::reversible_step", [&] {
    int64_t* xp = x.mutable_data_ptr<int64_t>();
    int64_t* vp = v.mutable_data_ptr<int64_t>();
    uint64_t* hp = reinterpret_cast<uint64_t*>(head.mutable_data_ptr<int64_t>());
    int32_t* cp = count.mutable_data_ptr<int32_t>();
    uint32_t* wp = reinterpret_cast<uint32_t*>(words.mutable_data_ptr<int32_t>());
    scalar_t* yp = view.mutable_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    constexpr bool kLaneType = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
    const bool lanes = STN_EXT_LANES && kLaneType && p.n >= 2 && p.n < rev::kDen && cpu_has_lanes();
    for_blocks(n, [&](int64_t b, int64_t i0, int64_t i1) {
      uint64_t flags = 0;
      int32_t mc = 0, mc_i = 0;  // the largest count that changed in this block
      const auto element = [&](int64_t i) {
        flags |= rev::step_element<scalar_t>(xp + i, vp + i, hp + i, cp + i, wp + i, n, capacity, yp + i, gp[i], p,
                                             &mc_i);
        mc = std::max(mc, mc_i);
      };
#if STN_EXT_LANES
      if constexpr (kLaneType) {
        if (lanes) {
          uint64_t outside[kBlock];
          if (step_lanes<scalar_t>(xp + i0, vp + i0, hp + i0, yp + i0, gp + i0, outside, i1 - i0, p)) {
            for (int64_t i = i0; i < i1; ++i) {
              if (outside[i - i0]) element(i);  // a word written or read, or an edge case: about 1 in 200
            }
          }
          res.flags[b] = flags;
          res.max_count[b] = mc;
          return;
        }
      }
#endif
      for (int64_t i = i0; i < i1; ++i) element(i);
      res.flags[b] = flags;
      res.max_count[b] = mc;
    });
  });
  res.finish(status);
}

at::Tensor reversible_unstep_weights_cpu(const at::Tensor& x, const at::Tensor& v, const at::Tensor& view,
                                         const std::optional<at::Tensor>& dx_in, const at::Tensor& status,
                                         double lr, int64_t radix_bits) {
  check_unstep_weights(x, v, view, dx_in, status, c10::kCPU);
  const rev::Params p = check_scalars(lr, rev::kDen, radix_bits);
  const auto vc = v.contiguous();
  const auto dx = contiguous_or_none(dx_in);
  const int64_t n = view.numel();
  BlockResults res((n + kBlock - 1) / kBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, view.scalar_type(), "stn_ext::reversible_unstep_weights", [&] {
    int64_t* xp = x.mutable_data_ptr<int64_t>();
    const int64_t* vp = vc.const_data_ptr<int64_t>();
    scalar_t* yp = view.mutable_data_ptr<scalar_t>();
    const scalar_t* dxp = dx ? dx->const_data_ptr<scalar_t>() : nullptr;
    for_blocks(n, [&](int64_t b, int64_t i0, int64_t i1) {
      uint64_t flags = 0;
      double sum = 0.0;
      for (int64_t i = i0; i < i1; ++i) {
        if (dxp) sum += static_cast<double>(dxp[i]) * (static_cast<double>(vp[i]) * p.inv_scale);
        flags |= rev::unstep_weights_element<scalar_t>(xp + i, vp[i], yp + i, p);
      }
      res.flags[b] = flags;
      res.sum[b] = sum;
    });
  });
  return at::scalar_tensor(res.finish(status), view.options().dtype(at::kDouble));
}

at::Tensor reversible_unstep_velocity_cpu(const at::Tensor& v, const at::Tensor& head, const at::Tensor& count,
                                          const at::Tensor& words, const at::Tensor& grad_in,
                                          const std::optional<at::Tensor>& dx_in,
                                          const std::optional<at::Tensor>& dv, const at::Tensor& status,
                                          double lr, int64_t gamma_num, int64_t radix_bits) {
  const int64_t capacity = check_unstep_velocity(v, head, count, words, grad_in, dx_in, dv, status, c10::kCPU);
  const rev::Params p = check_scalars(lr, gamma_num, radix_bits);
  const auto grad = grad_in.contiguous();
  const auto dx = contiguous_or_none(dx_in);
  const int64_t n = grad.numel();
  BlockResults res((n + kBlock - 1) / kBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "stn_ext::reversible_unstep_velocity", [&] {
    int64_t* vp = v.mutable_data_ptr<int64_t>();
    uint64_t* hp = reinterpret_cast<uint64_t*>(head.mutable_data_ptr<int64_t>());
    int32_t* cp = count.mutable_data_ptr<int32_t>();
    uint32_t* wp = reinterpret_cast<uint32_t*>(words.mutable_data_ptr<int32_t>());
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* dxp = dx ? dx->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dvp = dv ? dv->mutable_data_ptr<scalar_t>() : nullptr;
    for_blocks(n, [&](int64_t b, int64_t i0, int64_t i1) {
      uint64_t flags = 0;
      int32_t mc = 0, mc_i = 0;
      double sum = 0.0;
      for (int64_t i = i0; i < i1; ++i) {
        const double g = static_cast<double>(gp[i]);
        flags |= rev::unstep_velocity_element(vp + i, hp + i, cp + i, wp + i, n, capacity, g, p, &mc_i);
        mc = std::max(mc, mc_i);
        if (dvp) {
          double d = static_cast<double>(dvp[i]);
          if (dxp) {
            d = rev::adjoint_velocity(d, lr, static_cast<double>(dxp[i]));
            dvp[i] = static_cast<scalar_t>(d);
            d = static_cast<double>(dvp[i]);
          }
          sum += d * (static_cast<double>(vp[i]) * p.inv_scale + g);
        }
      }
      res.flags[b] = flags;
      res.max_count[b] = mc;
      res.sum[b] = sum;
    });
  });
  return at::scalar_tensor(res.finish(status), grad.options().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(stn_ext, CPU, m) {
  m.impl("reversible_step", &reversible_step_cpu);
  m.impl("reversible_unstep_weights", &reversible_unstep_weights_cpu);
  m.impl("reversible_unstep_velocity", &reversible_unstep_velocity_cpu);
}

}  // namespace stn_ext
