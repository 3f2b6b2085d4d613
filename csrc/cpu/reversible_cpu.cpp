// CPU kernels of exact reversible SGD with momentum: at::parallel_for loops around the element maths of
// reversible_math.h. Elements are taken in fixed blocks, and the per-block partial results (flags,
// largest stack count, float64 partial sums) are combined in block order, so results do not depend on
// the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "reversible_checks.h"
#include "reversible_lanes.h"
#include "reversible_lanes_avx512.h"
#include "reversible_math.h"

namespace stn_ext {
namespace {

constexpr int64_t kBlock = 4096;

// The CPU's vector path: the widest the CPU has, or the one STN_EXT_REVERSIBLE_LANES names (auto, avx512,
// avx2, scalar), read at every call so that the tests can hold each path against the scalar one.
enum class Lanes { kScalar, kAvx2, kAvx512 };

Lanes lanes_path() {
  const char* env = std::getenv("STN_EXT_REVERSIBLE_LANES");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") {
    return lanes::cpu_has_avx512() ? Lanes::kAvx512 : lanes::cpu_has_avx2() ? Lanes::kAvx2 : Lanes::kScalar;
  }
  if (want == "scalar") return Lanes::kScalar;
  if (want == "avx2") {
    TORCH_CHECK(lanes::cpu_has_avx2(), "stn_ext: STN_EXT_REVERSIBLE_LANES=avx2, but this CPU has no AVX2");
    return Lanes::kAvx2;
  }
  TORCH_CHECK(want == "avx512", "stn_ext: STN_EXT_REVERSIBLE_LANES must be auto, avx512, avx2 or scalar, got '",
              want, "'");
  TORCH_CHECK(lanes::cpu_has_avx512(),
              "stn_ext: STN_EXT_REVERSIBLE_LANES=avx512, but this CPU lacks AVX-512 F/DQ/BW/VL");
  return Lanes::kAvx512;
}

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

template <typename F>
void for_blocks(int64_t n, const F& body) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) body(b, b * kBlock, std::min(n, (b + 1) * kBlock));
  });
}

// The reverse ops take a thread's blocks in groups of up to kGroup neighbours: body(b_first, b_end).
constexpr int64_t kGroup = 4;

template <typename F>
void for_block_groups(int64_t n, const F& body) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b += kGroup) body(b, std::min(b1, b + kGroup));
  });
}

// sum[b] = term(i0) + term(i0 + 1) + ... over block b's elements, in element order, for the blocks of a group.
// A sum in element order is bound by the latency of its additions (about 4 cycles an element, as long as
// the rest of an unstep); a whole group's kGroup sums run side by side, each in its own order, so every
// block's sum has the bits it has alone.
template <typename Term>
void block_sums(int64_t b_first, int64_t b_end, int64_t n, double* sum, const Term& term) {
  if (b_end - b_first == kGroup && b_end * kBlock <= n) {
    const int64_t i0 = b_first * kBlock;
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    static_assert(kGroup == 4);
    for (int64_t j = 0; j < kBlock; ++j) {
      s0 += term(i0 + j);
      s1 += term(i0 + kBlock + j);
      s2 += term(i0 + 2 * kBlock + j);
      s3 += term(i0 + 3 * kBlock + j);
    }
    sum[b_first] = s0;
    sum[b_first + 1] = s1;
    sum[b_first + 2] = s2;
    sum[b_first + 3] = s3;
    return;
  }
  for (int64_t b = b_first; b < b_end; ++b) {
    double s = 0.0;
    for (int64_t i = b * kBlock, i1 = std::min(n, (b + 1) * kBlock); i < i1; ++i) s += term(i);
    sum[b] = s;
  }
}

// A thread's room for the adjoint terms of one group of blocks (the AVX-512 path computes them first).
inline double* group_terms() {
  thread_local std::vector<double> terms(kGroup * kBlock);
  return terms.data();
}

// The adjoint sums of a group of blocks into sum[b_first, b_end): with lane_terms (the AVX-512 path) the terms are
// stored first, lane_terms(i0, len, t) doing the first ones eight at a time (it returns how many) and term(i) the
// rest, then each block's sum of the stored terms; without, each block's sum of term(i). Both in element order.
template <typename Term, typename LaneTerms>
void group_sums(bool with_lane_terms, int64_t b_first, int64_t b_end, int64_t n, double* sum, const Term& term,
                const LaneTerms& lane_terms) {
  if (!with_lane_terms) {
    block_sums(b_first, b_end, n, sum, term);
    return;
  }
  const int64_t i0 = b_first * kBlock, i1 = std::min(n, b_end * kBlock);
  double* t = group_terms();
  for (int64_t i = i0 + lane_terms(i0, i1 - i0, t); i < i1; ++i) t[i - i0] = term(i);
  block_sums(b_first, b_end, n, sum, [&](int64_t i) { return t[i - i0]; });
}

// Runs element(i) on the elements of [i0, i1) that a reverse lane loop left (done: a bit per element, 4 a byte).
template <typename F>
void run_left(const uint8_t* done, int64_t i0, int64_t i1, const F& element) {
  const int64_t groups = (i1 - i0) / 4;
  for (int64_t j = 0; j < groups; ++j) {
    if (done[j] == 0xf) continue;
    for (int l = 0; l < 4; ++l) {
      if (!((done[j] >> l) & 1)) element(i0 + 4 * j + l);
    }
  }
  for (int64_t i = i0 + 4 * groups; i < i1; ++i) element(i);
}

// One block [i0, i1) of a reverse op: where there is a vector path, lane_loop(done) (which marks the elements it
// did and returns whether any are left), then element(i) on those left; elsewhere element(i) on every one.
template <typename LaneLoop, typename F>
void reverse_block(bool vector_path, int64_t i0, int64_t i1, const LaneLoop& lane_loop, const F& element) {
  if (vector_path) {
    uint8_t done[kBlock / 4];
    if (lane_loop(done)) run_left(done, i0, i1, element);  // an edge case (see the lane loops), or the tail
    return;
  }
  for (int64_t i = i0; i < i1; ++i) element(i);
}

void reversible_step_cpu(const at::Tensor& x, const at::Tensor& v, const at::Tensor& head,
                         const at::Tensor& count, const at::Tensor& words, const at::Tensor& view,
                         const at::Tensor& grad_in, const at::Tensor& status, double lr, int64_t gamma_num,
                         int64_t radix_bits) {
  const int64_t capacity = check_step(x, v, head, count, words, view, grad_in, status, c10::kCPU);
  const rev::Params p = check_scalars(lr, gamma_num, radix_bits);
  const auto grad = grad_in.contiguous();
  const int64_t n = view.numel();
  const Lanes path = lanes_path();
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
    const bool vector_path = STN_EXT_LANES && kLaneType && p.n >= 2 && p.n < rev::kDen && path != Lanes::kScalar;
    for_blocks(n, [&](int64_t b, int64_t i0, int64_t i1) {
      uint64_t flags = 0;
      int32_t mc = 0, mc_i = 0;  // the largest count that changed in this block
      const auto element = [&](int64_t i) {
        flags |= rev::step_element<scalar_t>(xp + i, vp + i, hp + i, cp + i, wp + i, n, capacity, yp + i, gp[i], p,
                                             &mc_i);
        mc = std::max(mc, mc_i);
      };
      bool stepped = false;
#if STN_EXT_LANES
      if constexpr (kLaneType) {
        if (vector_path) {
          uint64_t outside[kBlock];
          const bool left = path == Lanes::kAvx512
                                ? lanes::avx512::step<scalar_t>(xp + i0, vp + i0, hp + i0, yp + i0, gp + i0, outside, i1 - i0, p)
                                : lanes::step<scalar_t>(xp + i0, vp + i0, hp + i0, yp + i0, gp + i0, outside, i1 - i0, p);
          if (left) {
            for (int64_t i = i0; i < i1; ++i) {
              if (outside[i - i0]) element(i);  // a word written or read, or an edge case: about 1 in 200
            }
          }
          stepped = true;
        }
      }
#endif
      if (!stepped) {
        for (int64_t i = i0; i < i1; ++i) element(i);
      }
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
  const Lanes path = lanes_path();
  BlockResults res((n + kBlock - 1) / kBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, view.scalar_type(), "stn_ext::reversible_unstep_weights", [&] {
    int64_t* xp = x.mutable_data_ptr<int64_t>();
    const int64_t* vp = vc.const_data_ptr<int64_t>();
    scalar_t* yp = view.mutable_data_ptr<scalar_t>();
    const scalar_t* dxp = dx ? dx->const_data_ptr<scalar_t>() : nullptr;
    constexpr bool kLaneType = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
    const bool vector_path = STN_EXT_LANES && kLaneType && path != Lanes::kScalar;
    const bool lane_terms = STN_EXT_LANES && kLaneType && path == Lanes::kAvx512;  // the adjoint terms on AVX-512
    for_block_groups(n, [&](int64_t b_first, int64_t b_end) {
      if (dxp) {  // v is not changed by this op: the sums first, each block's in element order
        const auto term = [&](int64_t i) {
          return static_cast<double>(dxp[i]) * (static_cast<double>(vp[i]) * p.inv_scale);
        };
        group_sums(lane_terms, b_first, b_end, n, res.sum.data(), term, [&](int64_t i0, int64_t len, double* t) {
#if STN_EXT_LANES
          if constexpr (kLaneType) return lanes::avx512::weights_terms<scalar_t>(dxp + i0, vp + i0, t, len, p);
#endif
          (void)i0, (void)len, (void)t;
          return int64_t{0};  // not reached: lane_terms needs the lanes and a lane type
        });
      }
      for (int64_t b = b_first; b < b_end; ++b) {
        const int64_t i0 = b * kBlock, i1 = std::min(n, i0 + kBlock);
        uint64_t flags = 0;
        const auto element = [&](int64_t i) { flags |= rev::unstep_weights_element<scalar_t>(xp + i, vp[i], yp + i, p); };
        // (left to element: |v| >= 2^51, an overflow, or the tail)
        reverse_block(vector_path, i0, i1, [&](uint8_t* done) {
#if STN_EXT_LANES
          if constexpr (kLaneType) {
            return path == Lanes::kAvx512
                       ? lanes::avx512::unstep_weights<scalar_t>(xp + i0, vp + i0, yp + i0, done, i1 - i0, p)
                       : lanes::unstep_weights<scalar_t>(xp + i0, vp + i0, yp + i0, done, i1 - i0, p);
          }
#endif
          (void)done;
          return true;  // not reached: vector_path needs the lanes and a lane type
        }, element);
        res.flags[b] = flags;
      }
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
  const Lanes path = lanes_path();
  BlockResults res((n + kBlock - 1) / kBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "stn_ext::reversible_unstep_velocity", [&] {
    int64_t* vp = v.mutable_data_ptr<int64_t>();
    uint64_t* hp = reinterpret_cast<uint64_t*>(head.mutable_data_ptr<int64_t>());
    int32_t* cp = count.mutable_data_ptr<int32_t>();
    uint32_t* wp = reinterpret_cast<uint32_t*>(words.mutable_data_ptr<int32_t>());
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* dxp = dx ? dx->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dvp = dv ? dv->mutable_data_ptr<scalar_t>() : nullptr;
    constexpr bool kLaneType = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
    // (n >= 16: with |w| < 2^51, floor(w / n) 2^16 cannot overflow; smaller momenta take the scalar loop)
    const bool vector_path = STN_EXT_LANES && kLaneType && p.n >= 16 && p.n < rev::kDen && path != Lanes::kScalar;
    const bool lane_terms = STN_EXT_LANES && kLaneType && path == Lanes::kAvx512;  // the adjoint terms on AVX-512
    for_block_groups(n, [&](int64_t b_first, int64_t b_end) {
      for (int64_t b = b_first; b < b_end; ++b) {
        const int64_t i0 = b * kBlock, i1 = std::min(n, i0 + kBlock);
        uint64_t flags = 0;
        int32_t mc = 0, mc_i = 0;
        const auto element = [&](int64_t i) {
          flags |= rev::unstep_velocity_element(vp + i, hp + i, cp + i, wp + i, n, capacity,
                                                static_cast<double>(gp[i]), p, &mc_i);
          mc = std::max(mc, mc_i);
        };
        // (left to element: a word written or read, or an edge case: about 1 in 200)
        reverse_block(vector_path, i0, i1, [&](uint8_t* done) {
#if STN_EXT_LANES
          if constexpr (kLaneType) {
            return path == Lanes::kAvx512
                       ? lanes::avx512::unstep_velocity<scalar_t>(vp + i0, hp + i0, gp + i0, done, i1 - i0, p)
                       : lanes::unstep_velocity<scalar_t>(vp + i0, hp + i0, gp + i0, done, i1 - i0, p);
          }
#endif
          (void)done;
          return true;  // not reached: vector_path needs the lanes and a lane type
        }, element);
        res.flags[b] = flags;
        res.max_count[b] = mc;
      }
      if (dvp) {  // the adjoint, from the restored v, each block's sum in element order
        const auto term = [&](int64_t i) {
          const double g = static_cast<double>(gp[i]);
          double d = static_cast<double>(dvp[i]);
          if (dxp) {
            d = rev::adjoint_velocity(d, lr, static_cast<double>(dxp[i]));
            dvp[i] = static_cast<scalar_t>(d);
            d = static_cast<double>(dvp[i]);
          }
          return d * (static_cast<double>(vp[i]) * p.inv_scale + g);
        };
        // (the AVX-512 path: dv and the terms eight at a time)
        group_sums(lane_terms, b_first, b_end, n, res.sum.data(), term, [&](int64_t i0, int64_t len, double* t) {
#if STN_EXT_LANES
          if constexpr (kLaneType) {
            return lanes::avx512::velocity_terms<scalar_t>(gp + i0, dxp ? dxp + i0 : nullptr, dvp + i0, vp + i0, t, len,
                                                           lr, p);
          }
#endif
          (void)i0, (void)len, (void)t;
          return int64_t{0};  // not reached: lane_terms needs the lanes and a lane type
        });
      }
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
