// Autograd of the STN layer ops, registered at the Autograd dispatch key as PyTorch's own ops have it
// (a Python registration cost 19-32 us per call; this costs a few). Each forward op's backward calls
// its backward op through the dispatcher, and each backward op has a backward of its own in plain ATen
// ops, so double backward works: the trainer and reversible learning take Hessian-vector products.
// The fake kernels, which torch.compile traces with, stay in stn_ext/ops.py.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "op_args.h"
#include "op_handles.h"

namespace stn_ext {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

// The ops (op_handles.h) are called below the autograd key from a forward and at the top (recorded, for
// double backward) from a backward.

Tensor add_defined(const Tensor& a, const Tensor& b) { return a.defined() ? a + b : b; }

// In a backward: the backward op through its autograd kernel when the graph is being recorded (double
// backward), else straight below it (a first-order backward, the common case, skips the recording's cost).
struct RecordIfGrad {
  std::optional<at::AutoDispatchBelowADInplaceOrView> below;
  RecordIfGrad() {
    if (!at::GradMode::is_enabled()) below.emplace();
  }
};

// --- gate: W = elem + scale (.)row hyper ----------------------------------------------------------

// scale (out,) viewed to broadcast over the rows of `like` (out, ...).
Tensor row(const Tensor& scale, const Tensor& like) {
  std::vector<int64_t> shape(std::max<int64_t>(like.dim(), 1), 1);
  shape[0] = -1;
  return scale.view(shape);
}

Tensor row_sum(const Tensor& t) {
  if (t.dim() <= 1) return t;
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < t.dim(); ++d) dims.push_back(d);
  return t.sum(dims);
}

struct Gate : torch::autograd::Function<Gate> {
  static Tensor forward(AutogradContext* ctx, const Tensor& elem, const Tensor& hyper, const Tensor& scale) {
    ctx->save_for_backward({hyper, scale});
    at::AutoDispatchBelowADInplaceOrView below;
    return ops::gate().call(elem, hyper, scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& grad = grads[0];
    Tensor grad_hyper, grad_scale;
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      const RecordIfGrad record;
      std::tie(grad_hyper, grad_scale) = ops::gate_backward().call(grad, saved[0], saved[1]);
    }
    return {ctx->needs_input_grad(0) ? grad : Tensor(), grad_hyper, grad_scale};
  }
};

// The backward op is bilinear; its own derivative in plain ops (double backward).
struct GateBackward : torch::autograd::Function<GateBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad, const Tensor& hyper, const Tensor& scale) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad, hyper, scale});
    at::AutoDispatchBelowADInplaceOrView below;
    auto [grad_hyper, grad_scale] = ops::gate_backward().call(grad, hyper, scale);
    return {grad_hyper, grad_scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &grad = saved[0], &hyper = saved[1], &scale = saved[2];
    const Tensor &g_hyper = grads[0], &g_scale = grads[1];
    Tensor d_grad, d_hyper, d_scale;
    if (ctx->needs_input_grad(0)) {
      if (g_hyper.defined()) d_grad = row(scale, grad) * g_hyper;
      if (g_scale.defined()) d_grad = add_defined(d_grad, row(g_scale, grad) * hyper);
    }
    if (ctx->needs_input_grad(1) && g_scale.defined()) d_hyper = row(g_scale, grad) * grad;
    if (ctx->needs_input_grad(2) && g_hyper.defined()) d_scale = row_sum(g_hyper * grad);
    return {d_grad, d_hyper, d_scale};
  }
};

Tensor gate_autograd(const Tensor& elem, const Tensor& hyper, const Tensor& scale) {
  return Gate::apply(elem, hyper, scale);
}

std::tuple<Tensor, Tensor> gate_backward_autograd(const Tensor& grad, const Tensor& hyper, const Tensor& scale) {
  auto out = GateBackward::apply(grad, hyper, scale);
  return {out[0], out[1]};
}

// --- per_example_linear: one GEMM against [W_e; W_h], then the fused epilogue ----------------------

struct PerExampleLinear : torch::autograd::Function<PerExampleLinear> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight_elem,
                               const Tensor& weight_hyper, const Tensor& s, const OptTensor& offset) {
    Tensor y, h;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, h) = ops::per_example_linear().call(x, weight_elem, weight_hyper, s, offset);
    }
    ctx->saved_data["offset_dim"] = offset ? offset->dim() : int64_t{-1};
    ctx->mark_non_differentiable({h});
    ctx->set_materialize_grads(false);  // no zero-filled gradient for h
    ctx->save_for_backward({x, weight_elem, weight_hyper, s, h});
    return {y, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad = grads[0];
    if (!grad.defined()) return variable_list(5);
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w_e = saved[1], &w_h = saved[2], &s = saved[3];
    Tensor h = saved[4];
    if (at::GradMode::is_enabled()) {
      // Double backward: grad_s depends on x and W_h through h, which the forward saved detached.
      h = at::linear(x.flatten(0, -2), w_h).to(h.scalar_type());
    }
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    auto [dx, dw_e, dw_h, ds] = ops::per_example_linear_backward().call(grad, x, w_e, w_h, h, s, mask);
    Tensor d_offset;
    // needs_input_grad counts tensor inputs only: offset, when given, is the fifth.
    if (ctx->saved_data["offset_dim"].toInt() >= 0 && ctx->needs_input_grad(4)) {
      // grad summed over positions (if x had any), and over the batch for a shared offset.
      d_offset = x.dim() == 2 ? grad : grad.reshape_symint({s.sym_size(0), positions(x), s.sym_size(1)}).sum(1);
      if (ctx->saved_data["offset_dim"].toInt() == 1) d_offset = d_offset.sum(0);
    }
    return {dx, dw_e, dw_h, ds, d_offset};
  }
};

std::tuple<Tensor, Tensor> per_example_linear_autograd(const Tensor& x, const Tensor& weight_elem,
                                                       const Tensor& weight_hyper, const Tensor& s,
                                                       const OptTensor& offset) {
  auto out = PerExampleLinear::apply(x, weight_elem, weight_hyper, s, offset);
  return {out[0], out[1]};
}

// --- per-example epilogue: y = e + s (.) h + offset ------------------------------------------------

// The (e, h) halves of a stacked output o, each shaped like the layer output (see op_schemas.h).
std::pair<Tensor, Tensor> split_halves(const Tensor& o, int64_t groups, bool channels_last) {
  const c10::SymInt B = o.sym_size(0);
  if (channels_last) {
    const c10::SymInt P = o.sym_size(1), C2 = o.sym_size(2);
    const Tensor v = o.reshape_symint({B, P, groups, 2, C2 / (2 * groups)});
    return {v.select(3, 0).reshape_symint({B, P, C2 / 2}), v.select(3, 1).reshape_symint({B, P, C2 / 2})};
  }
  const c10::SymInt C2 = o.sym_size(1), P = o.sym_size(2);
  const Tensor v = o.reshape_symint({B, groups, 2, C2 / (2 * groups), P});
  return {v.select(2, 0).reshape_symint({B, C2 / 2, P}), v.select(2, 1).reshape_symint({B, C2 / 2, P})};
}

// Inverse of split_halves.
Tensor join_halves(const Tensor& e, const Tensor& h, int64_t groups, bool channels_last) {
  const c10::SymInt B = e.sym_size(0);
  if (channels_last) {
    const c10::SymInt P = e.sym_size(1), out = e.sym_size(2);
    const Tensor v = at::stack({e.reshape_symint({B, P, groups, out / groups}),
                                h.reshape_symint({B, P, groups, out / groups})}, 3);
    return v.reshape_symint({B, P, 2 * out});
  }
  const c10::SymInt out = e.sym_size(1), P = e.sym_size(2);
  const Tensor v = at::stack({e.reshape_symint({B, groups, out / groups, P}),
                              h.reshape_symint({B, groups, out / groups, P})}, 2);
  return v.reshape_symint({B, 2 * out, P});
}

// (B, out) broadcast over the positions of a (B, P, out) or (B, out, P) tensor.
Tensor per_position(const Tensor& t, bool channels_last) { return t.unsqueeze(channels_last ? 1 : 2); }

struct Epilogue : torch::autograd::Function<Epilogue> {
  static variable_list forward(AutogradContext* ctx, const Tensor& o, const Tensor& s, const OptTensor& offset,
                               int64_t groups, bool channels_last) {
    Tensor y, h;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, h) = ops::per_example_epilogue().call(o, s, offset, groups, channels_last);
    }
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["channels_last"] = channels_last;
    ctx->saved_data["offset_dim"] = offset ? offset->dim() : int64_t{-1};
    ctx->set_materialize_grads(false);  // h's gradient is undefined but in double backward
    // h (an output, differentiable: the copy of o's h half) rather than o: half the memory kept.
    ctx->save_for_backward({h, s});
    return {y, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &h = saved[0], &s = saved[1];
    const int64_t g = ctx->saved_data["groups"].toInt();
    const bool cl = ctx->saved_data["channels_last"].toBool();
    const Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(h);
    Tensor grad_o, grad_s, grad_sum;
    {
      const RecordIfGrad record;
      std::tie(grad_o, grad_s, grad_sum) = ops::per_example_epilogue_backward().call(grad, h, s, g, cl);
    }
    if (grads[1].defined()) grad_o = grad_o + join_halves(at::zeros_like(grads[1]), grads[1], g, cl);
    Tensor grad_offset;
    // needs_input_grad counts tensor inputs only: offset, when given, is the third.
    if (ctx->saved_data["offset_dim"].toInt() >= 0 && ctx->needs_input_grad(2)) {
      grad_offset = ctx->saved_data["offset_dim"].toInt() == 1 ? grad_sum.sum(0) : grad_sum;
    }
    return {grad_o, grad_s, grad_offset, Tensor(), Tensor()};
  }
};

// Derivative of (grad_o, grad_s, grad_sum) in plain ops (double backward).
struct EpilogueBackward : torch::autograd::Function<EpilogueBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad, const Tensor& h, const Tensor& s,
                               int64_t groups, bool channels_last) {
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["channels_last"] = channels_last;
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad, h, s});
    at::AutoDispatchBelowADInplaceOrView below;
    auto [grad_o, grad_s, grad_sum] = ops::per_example_epilogue_backward().call(grad, h, s, groups, channels_last);
    return {grad_o, grad_s, grad_sum};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &grad = saved[0], &h = saved[1], &s = saved[2];
    const int64_t g = ctx->saved_data["groups"].toInt();
    const bool cl = ctx->saved_data["channels_last"].toBool();
    const Tensor &a_o = grads[0], &a_s = grads[1], &a_sum = grads[2];
    Tensor d_grad = at::zeros_like(grad), d_h, d_s;
    if (a_o.defined()) {
      auto [a_e, a_h] = split_halves(a_o, g, cl);
      d_grad = d_grad + a_e + per_position(s, cl) * a_h;
      d_s = (a_h * grad).sum(cl ? 1 : 2);
    }
    if (a_s.defined()) {
      d_grad = d_grad + per_position(a_s, cl) * h;
      d_h = per_position(a_s, cl) * grad;
    }
    if (a_sum.defined()) d_grad = d_grad + per_position(a_sum, cl);
    return {d_grad, d_h, d_s, Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> epilogue_autograd(const Tensor& o, const Tensor& s, const OptTensor& offset,
                                             int64_t groups, bool channels_last) {
  auto out = Epilogue::apply(o, s, offset, groups, channels_last);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor> epilogue_backward_autograd(const Tensor& grad, const Tensor& h, const Tensor& s,
                                                              int64_t groups, bool channels_last) {
  auto out = EpilogueBackward::apply(grad, h, s, groups, channels_last);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(stn_ext, Autograd, m) {
  m.impl("gate", &gate_autograd);
  m.impl("gate_backward", &gate_backward_autograd);
  m.impl("per_example_linear", &per_example_linear_autograd);
  m.impl("per_example_epilogue", &epilogue_autograd);
  m.impl("per_example_epilogue_backward", &epilogue_backward_autograd);
}

}  // namespace stn_ext
