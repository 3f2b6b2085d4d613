// CPU kernels of the STN layer ops: at::parallel_for loops around the shared maths of stn_math.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

at::Tensor per_example_epilogue_cpu(const at::Tensor& o, const at::Tensor& s, const std::optional<at::Tensor>& t,
                                    const std::optional<at::Tensor>& bias_elem,
                                    const std::optional<at::Tensor>& bias_hyper, int64_t groups,
                                    bool channels_last) {
  auto c = prepare_epilogue(o, s, t, bias_elem, bias_hyper, groups, channels_last, c10::kCPU);
  const auto& z = c.z;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.o.scalar_type(), "stn_ext::per_example_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* op = c.o.const_data_ptr<scalar_t>();
    const scalar_t* sp = c.s.const_data_ptr<scalar_t>();
    const scalar_t* tp = optional_ptr<scalar_t>(c.t);
    const scalar_t* bep = optional_ptr<scalar_t>(c.bias_elem);
    const scalar_t* bhp = optional_ptr<scalar_t>(c.bias_hyper);
    scalar_t* yp = c.y.mutable_data_ptr<scalar_t>();
    const int64_t out = z.out, P = z.positions, pg = z.per_group;
    // One task per (example, position) row when channels are innermost, else per (example, channel).
    const int64_t outer = channels_last ? z.batch * P : z.batch * out;
    const int64_t inner = channels_last ? out : P;
    at::parallel_for(0, outer, std::max<int64_t>(1, 16384 / std::max<int64_t>(inner, 1)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t k = 0; k < inner; ++k) {
          const int64_t b = channels_last ? i / P : i / out;
          const int64_t c = channels_last ? k : i % out;
          const int64_t p = channels_last ? i % P : k;
          const int64_t bc = b * out + c;
          const acc_t bias = epilogue_bias<acc_t>(bep ? static_cast<acc_t>(bep[c]) : acc_t(0),
                                                  tp ? static_cast<acc_t>(tp[bc]) : acc_t(0),
                                                  bhp ? static_cast<acc_t>(bhp[c]) : acc_t(0));
          const int64_t ce = elem_channel(c, pg);
          yp[offset3(b, c, p, out, P, channels_last)] = epilogue_value<scalar_t, acc_t>(
              op[offset3(b, ce, p, 2 * out, P, channels_last)], op[offset3(b, ce + pg, p, 2 * out, P, channels_last)],
              static_cast<acc_t>(sp[bc]), bias);
        }
      }
    });
  });
  return c.y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> per_example_epilogue_backward_cpu(
    const at::Tensor& grad, const at::Tensor& o, const at::Tensor& s, int64_t groups, bool channels_last) {
  auto c = prepare_epilogue_backward(grad, o, s, groups, channels_last, c10::kCPU);
  const auto& z = c.z;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.o.scalar_type(), "stn_ext::per_example_epilogue_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = c.grad.const_data_ptr<scalar_t>();
    const scalar_t* op = c.o.const_data_ptr<scalar_t>();
    const scalar_t* sp = c.s.const_data_ptr<scalar_t>();
    scalar_t* gop = c.grad_o.mutable_data_ptr<scalar_t>();
    scalar_t* gsp = c.grad_s.mutable_data_ptr<scalar_t>();
    scalar_t* gsum = c.grad_sum.mutable_data_ptr<scalar_t>();
    const int64_t out = z.out, P = z.positions, pg = z.per_group;
    // Each task owns whole (example, channel) sums: for channels_last it takes examples and keeps
    // a row of accumulators; otherwise it takes (example, channel) rows.
    const bool by_example = channels_last;
    const int64_t outer = by_example ? z.batch : z.batch * out;
    const int64_t work = by_example ? P * out : P;
    at::parallel_for(0, outer, std::max<int64_t>(1, 16384 / std::max<int64_t>(work, 1)), [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> ds(by_example ? out : 1), gs(by_example ? out : 1);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = by_example ? i : i / out;
        const int64_t c0 = by_example ? 0 : i % out;
        const int64_t c1 = by_example ? out : c0 + 1;
        std::fill(ds.begin(), ds.end(), acc_t(0));
        std::fill(gs.begin(), gs.end(), acc_t(0));
        for (int64_t p = 0; p < P; ++p) {
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t ce = elem_channel(c, pg);
            const int64_t oe = offset3(b, ce, p, 2 * out, P, channels_last);
            const int64_t oh = offset3(b, ce + pg, p, 2 * out, P, channels_last);
            epilogue_backward_value<scalar_t, acc_t>(gp[offset3(b, c, p, out, P, channels_last)], op[oh],
                                                     static_cast<acc_t>(sp[b * out + c]), gop + oe, gop + oh,
                                                     &ds[c - c0], &gs[c - c0]);
          }
        }
        for (int64_t c = c0; c < c1; ++c) {
          gsp[b * out + c] = static_cast<scalar_t>(ds[c - c0]);
          gsum[b * out + c] = static_cast<scalar_t>(gs[c - c0]);
        }
      }
    });
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
