// CPU kernels of the STN layer ops: at::parallel_for loops around the shared maths of stn_math.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "op_args.h"
#include "stn_math.h"

namespace stn_ext {
namespace {

at::Tensor gate_cpu(const at::Tensor& elem, const at::Tensor& hyper, const at::Tensor& scale) {
  auto c = prepare_gate(elem, hyper, scale, c10::kCPU);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.elem.scalar_type(), "stn_ext::gate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* e = c.elem.const_data_ptr<scalar_t>();
    const scalar_t* h = c.hyper.const_data_ptr<scalar_t>();
    const scalar_t* s = c.scale.const_data_ptr<scalar_t>();
    scalar_t* w = c.out.mutable_data_ptr<scalar_t>();
    const int64_t cols = c.z.cols;
    at::parallel_for(0, c.z.rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)),
                     [&](int64_t r0, int64_t r1) {
                       for (int64_t r = r0; r < r1; ++r) {
                         const acc_t sr = static_cast<acc_t>(s[r]);
                         const int64_t base = r * cols;
                         for (int64_t j = 0; j < cols; ++j) {
                           w[base + j] = gate_value<scalar_t, acc_t>(e[base + j], h[base + j], sr);
                         }
                       }
                     });
  });
  return c.out;
}

std::tuple<at::Tensor, at::Tensor> gate_backward_cpu(const at::Tensor& grad, const at::Tensor& hyper,
                                                     const at::Tensor& scale) {
  auto c = prepare_gate_backward(grad, hyper, scale, c10::kCPU);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.grad.scalar_type(), "stn_ext::gate_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = c.grad.const_data_ptr<scalar_t>();
    const scalar_t* h = c.hyper.const_data_ptr<scalar_t>();
    const scalar_t* s = c.scale.const_data_ptr<scalar_t>();
    scalar_t* gh = c.grad_hyper.mutable_data_ptr<scalar_t>();
    scalar_t* gs = c.grad_scale.mutable_data_ptr<scalar_t>();
    const int64_t cols = c.z.cols;
    at::parallel_for(0, c.z.rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)),
                     [&](int64_t r0, int64_t r1) {
                       for (int64_t r = r0; r < r1; ++r) {
                         const acc_t sr = static_cast<acc_t>(s[r]);
                         const int64_t base = r * cols;
                         acc_t sum = 0;
                         for (int64_t j = 0; j < cols; ++j) {
                           sum += gate_backward_value<scalar_t, acc_t>(g[base + j], h[base + j], sr, gh + base + j);
                         }
                         gs[r] = static_cast<scalar_t>(sum);
                       }
                     });
  });
  return {c.grad_hyper, c.grad_scale};
}

// The epilogue loops walk contiguous runs (channels of one group at one position, or positions of
// one channel), with the offset's presence chosen at compile time, so the compiler vectorises them.

// y[j] = e[j] + s[j] h[j] + offset[j] along a run of channels at one position; h is kept in h_kept.
template <bool kOffset, typename scalar_t, typename acc_t>
inline void epilogue_channels(const scalar_t* __restrict__ e, const scalar_t* __restrict__ h,
                              const scalar_t* __restrict__ s, const scalar_t* __restrict__ offset,
                              scalar_t* __restrict__ y, scalar_t* __restrict__ h_kept, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t off = kOffset ? static_cast<acc_t>(offset[j]) : acc_t(0);
    y[j] = epilogue_value<scalar_t, acc_t>(e[j], h[j], static_cast<acc_t>(s[j]), off);
    h_kept[j] = h[j];
  }
}

// Calls f with std::integral_constant<bool, flag>.
template <typename F>
inline void with_flag(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

std::tuple<at::Tensor, at::Tensor> per_example_epilogue_cpu(const at::Tensor& o, const at::Tensor& s,
                                                            const std::optional<at::Tensor>& offset, int64_t groups,
                                                            bool channels_last) {
  auto c = prepare_epilogue(o, s, offset, groups, channels_last, c10::kCPU);
  const auto& z = c.z;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.o.scalar_type(), "stn_ext::per_example_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* op = c.o.const_data_ptr<scalar_t>();
    const scalar_t* sp = c.s.const_data_ptr<scalar_t>();
    const scalar_t* offp = optional_ptr<scalar_t>(c.offset);
    scalar_t* yp = c.y.mutable_data_ptr<scalar_t>();
    scalar_t* hp = c.h.mutable_data_ptr<scalar_t>();
    const int64_t out = z.out, P = z.positions, pg = z.per_group, G = groups, ostride = c.offset_stride;
    with_flag(offp != nullptr, [&](auto has_offset) {
      constexpr bool kOffset = decltype(has_offset)::value;
      if (channels_last) {
        // Rows of (example, position): each group's channels are one run.
        at::parallel_for(0, z.batch * P, std::max<int64_t>(1, 16384 / std::max<int64_t>(out, 1)), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t b = r / P;
            for (int64_t g = 0; g < G; ++g) {
              const scalar_t* e = op + r * 2 * out + g * 2 * pg;
              epilogue_channels<kOffset, scalar_t, acc_t>(e, e + pg, sp + b * out + g * pg,
                                                          kOffset ? offp + b * ostride + g * pg : nullptr,
                                                          yp + r * out + g * pg, hp + r * out + g * pg, pg);
            }
          }
        });
      } else {
        // Rows of (example, channel): the positions are one run with one scale and one offset.
        at::parallel_for(0, z.batch * out, std::max<int64_t>(1, 16384 / std::max<int64_t>(P, 1)), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t b = r / out, ch = r % out;
            const acc_t off = kOffset ? static_cast<acc_t>(offp[b * ostride + ch]) : acc_t(0);
            const acc_t sv = static_cast<acc_t>(sp[r]);
            const scalar_t* e = op + (b * 2 * out + elem_channel(ch, pg)) * P;
            const scalar_t* h = e + pg * P;
            scalar_t* __restrict__ y = yp + r * P;
            scalar_t* __restrict__ h_kept = hp + r * P;
            for (int64_t q = 0; q < P; ++q) {
              y[q] = epilogue_value<scalar_t, acc_t>(e[q], h[q], sv, off);
              h_kept[q] = h[q];
            }
          }
        });
      }
    });
  });
  return {c.y, c.h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> per_example_epilogue_backward_cpu(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& s, int64_t groups, bool channels_last) {
  auto c = prepare_epilogue_backward(grad, h, s, groups, channels_last, c10::kCPU);
  const auto& z = c.z;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.h.scalar_type(), "stn_ext::per_example_epilogue_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = c.grad.const_data_ptr<scalar_t>();
    const scalar_t* hp = c.h.const_data_ptr<scalar_t>();
    const scalar_t* sp = c.s.const_data_ptr<scalar_t>();
    scalar_t* gop = c.grad_o.mutable_data_ptr<scalar_t>();
    scalar_t* gsp = c.grad_s.mutable_data_ptr<scalar_t>();
    scalar_t* gsum = c.grad_sum.mutable_data_ptr<scalar_t>();
    const int64_t out = z.out, P = z.positions, pg = z.per_group, G = groups;  // out / pg, but out may be 0
    if (channels_last) {
      // One task per example owns its (out,) sums; positions are walked in order, channels in runs.
      at::parallel_for(0, z.batch, std::max<int64_t>(1, 16384 / std::max<int64_t>(P * out, 1)), [&](int64_t b0, int64_t b1) {
        std::vector<acc_t> ds(out), gs(out);
        for (int64_t b = b0; b < b1; ++b) {
          std::fill(ds.begin(), ds.end(), acc_t(0));
          std::fill(gs.begin(), gs.end(), acc_t(0));
          const scalar_t* s_row = sp + b * out;
          for (int64_t q = 0; q < P; ++q) {
            const int64_t r = b * P + q;
            for (int64_t g = 0; g < G; ++g) {
              const int64_t off = r * 2 * out + g * 2 * pg, c0 = g * pg;
              const scalar_t* __restrict__ gr = gp + r * out + c0;
              const scalar_t* __restrict__ h = hp + r * out + c0;
              const scalar_t* __restrict__ s_g = s_row + c0;
              scalar_t* __restrict__ ge = gop + off;
              scalar_t* __restrict__ gh = gop + off + pg;
              acc_t* __restrict__ dsg = ds.data() + c0;
              acc_t* __restrict__ gsg = gs.data() + c0;
              for (int64_t j = 0; j < pg; ++j) {
                epilogue_backward_value<scalar_t, acc_t>(gr[j], h[j], static_cast<acc_t>(s_g[j]), ge + j, gh + j, dsg + j,
                                                         gsg + j);
              }
            }
          }
          for (int64_t ch = 0; ch < out; ++ch) {
            gsp[b * out + ch] = static_cast<scalar_t>(ds[ch]);
            gsum[b * out + ch] = static_cast<scalar_t>(gs[ch]);
          }
        }
      });
    } else {
      // Rows of (example, channel): the positions are one run.
      at::parallel_for(0, z.batch * out, std::max<int64_t>(1, 16384 / std::max<int64_t>(P, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / out, ch = r % out;
          const int64_t off = (b * 2 * out + elem_channel(ch, pg)) * P;
          const scalar_t* __restrict__ gr = gp + r * P;
          const scalar_t* __restrict__ h = hp + r * P;
          scalar_t* __restrict__ ge = gop + off;
          scalar_t* __restrict__ gh = gop + off + pg * P;
          const acc_t sv = static_cast<acc_t>(sp[r]);
          acc_t ds = 0, gs = 0;
          for (int64_t q = 0; q < P; ++q) {
            epilogue_backward_value<scalar_t, acc_t>(gr[q], h[q], sv, ge + q, gh + q, &ds, &gs);
          }
          gsp[r] = static_cast<scalar_t>(ds);
          gsum[r] = static_cast<scalar_t>(gs);
        }
      });
    }
  });
  return {c.grad_o, c.grad_s, c.grad_sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(stn_ext, CPU, m) {
  m.impl("gate", &gate_cpu);
  m.impl("gate_backward", &gate_backward_cpu);
  m.impl("per_example_epilogue", &per_example_epilogue_cpu);
  m.impl("per_example_epilogue_backward", &per_example_epilogue_backward_cpu);
}

}  // namespace stn_ext
