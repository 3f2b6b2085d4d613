// The per-example STN linear layer as one op pair (MacKay et al. 2019, per-example lam):
//   forward:  o = x [W_e; W_h]^T in one GEMM, then the fused epilogue y = e + s (.) h + offset, where
//             offset = b_e + t (.) b_h is formed by the caller (one small GEMM); h is kept, o freed;
//   backward: with gs = g (.) s, dx = g W_e + gs W_h, dW_e = g^T x, dW_h = gs^T x, ds = sum_P g (.) h.
// Both are device generic (ATen's GEMMs; the epilogue kernel through the dispatcher), so they are
// registered once. The backward is CompositeImplicitAutograd: autograd differentiates its ATen ops,
// which gives double backward, while the forward's autograd (csrc/autograd.cpp) calls it with grad mode
// off, so a training step pays no recording.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "op_args.h"
#include "op_handles.h"

namespace stn_ext {
namespace {

// [W_e; W_h] as a view when weight_hyper directly follows weight_elem in one storage (as StnLinear
// keeps them), else a copy.
at::Tensor stacked_weight(const at::Tensor& elem, const at::Tensor& hyper) {
  const bool adjacent = elem.is_contiguous() && hyper.is_contiguous() && elem.numel() > 0 &&
                        hyper.storage().is_alias_of(elem.storage()) &&
                        hyper.storage_offset() == elem.storage_offset() + elem.numel();
  if (adjacent) {
    return elem.as_strided({2 * elem.size(0), elem.size(1)}, {elem.size(1), 1});
  }
  return at::cat({elem, hyper});
}

// Checks of the linear-specific arguments; the epilogue kernel checks the offset.
void check_linear(const at::Tensor& x, const at::Tensor& weight_elem, const at::Tensor& weight_hyper,
                  const at::Tensor& s) {
  check_float(x, "x");
  check_same(weight_elem, "weight_elem", weight_hyper, "weight_hyper");
  TORCH_CHECK(x.device() == weight_elem.device(), "stn_ext: x is on ", x.device(), " but weight_elem is on ",
              weight_elem.device());
  TORCH_CHECK(weight_elem.dim() == 2, "stn_ext: weight_elem must be 2-D (out, in), got ", weight_elem.sizes());
  check_shape(weight_hyper, weight_elem.sizes(), "weight_hyper");
  TORCH_CHECK(x.dim() >= 2 && x.size(-1) == weight_elem.size(1), "stn_ext: x must have shape (B, ..., ",
              weight_elem.size(1), "), got ", x.sizes());
  TORCH_CHECK(s.dim() == 2 && s.size(0) == x.size(0) && s.size(1) == weight_elem.size(0),
              "stn_ext: s must have shape (B=", x.size(0), ", out=", weight_elem.size(0), "), got ", s.sizes());
}

std::tuple<at::Tensor, at::Tensor> per_example_linear(const at::Tensor& x, const at::Tensor& weight_elem,
                                                      const at::Tensor& weight_hyper, const at::Tensor& s,
                                                      const std::optional<at::Tensor>& offset) {
  check_linear(x, weight_elem, weight_hyper, s);
  const int64_t batch = x.size(0), in = weight_elem.size(1), out = weight_elem.size(0);
  const int64_t P = positions(x).expect_int();
  // Under autocast the inputs arrive cast (per_example_linear_autocast below).
  at::Tensor o = at::linear(x.reshape({batch * P, in}), stacked_weight(weight_elem, weight_hyper));
  const auto dt = o.scalar_type();
  const auto offset_dt = offset ? std::optional<at::Tensor>(offset->to(dt)) : std::nullopt;
  auto [y, h] = ops::per_example_epilogue().call(o.view({batch, P, 2 * out}), s.to(dt), offset_dt, 1, true);
  auto y_shape = x.sizes().vec();
  y_shape.back() = out;
  return {y.view(y_shape), h.view({batch * P, out})};
}

// Written with symbolic sizes: as a CompositeImplicitAutograd kernel it is traced by torch.compile.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> per_example_linear_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight_elem, const at::Tensor& weight_hyper,
    const at::Tensor& h, const at::Tensor& s, std::array<bool, 3> output_mask) {
  TORCH_CHECK(x.dim() >= 2 && weight_elem.dim() == 2 && h.dim() == 2 && s.dim() == 2,
              "stn_ext: per_example_linear_backward expects x (B, ..., in), 2-D weights, h (N, out) and s (B, out)");
  const c10::SymInt batch = x.sym_size(0), in = weight_elem.sym_size(1), out = weight_elem.sym_size(0);
  const c10::SymInt P = positions(x);
  // In grad's dtype. The autocast rule below gives the op inputs of one dtype, so the casts are no-ops
  // on the autograd path; they keep a direct call with mixed dtypes working.
  const auto dt = grad.scalar_type();
  // Contiguous (no copy when they already are), so both can be viewed as (N, out) GEMM operands.
  const at::Tensor g = grad.contiguous().view_symint({batch, P, out});
  const at::Tensor g2 = g.view_symint({batch * P, out});
  const at::Tensor gs = (g * s.to(dt).unsqueeze(1)).contiguous().view_symint({batch * P, out});  // g (.) s
  at::Tensor dx, dw_e, dw_h;
  if (output_mask[0]) {
    dx = at::addmm(at::mm(g2, weight_elem.to(dt)), gs, weight_hyper.to(dt)).view_symint(x.sym_sizes()).to(x.scalar_type());
  }
  const at::Tensor x2 = x.reshape_symint({batch * P, in}).to(dt);
  if (output_mask[1]) dw_e = at::mm(g2.t(), x2).to(weight_elem.scalar_type());
  if (output_mask[2]) dw_h = at::mm(gs.t(), x2).to(weight_hyper.scalar_type());
  // One position per example (x of shape (B, in)) needs no sum over positions.
  const at::Tensor ds = x.dim() == 2 ? g2 * h : (g * h.view_symint({batch, P, out})).sum(1);
  return {dx, dw_e, dw_h, ds.to(s.scalar_type())};
}

// Autocast rule, as ATen's lower-precision ops have: the inputs are cast to the autocast dtype and the
// op runs with autocast off. (Leaving it to the at::linear inside the op worked in eager mode only: under
// torch.compile the op then ran in float32.) W_e and W_h are cast into one (2, out, in) buffer, so the
// op still reads them as one stacked matrix without a copy.
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> per_example_linear_autocast(const at::Tensor& x, const at::Tensor& weight_elem,
                                                               const at::Tensor& weight_hyper, const at::Tensor& s,
                                                               const std::optional<at::Tensor>& offset) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const auto dt = at::autocast::get_autocast_dtype(kDevice);
  const auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dt, t, kDevice); };
  at::Tensor w_e = weight_elem, w_h = weight_hyper;
  if (at::autocast::is_eligible(weight_elem, kDevice) && at::autocast::is_eligible(weight_hyper, kDevice) &&
      weight_elem.sizes() == weight_hyper.sizes()) {
    at::Tensor both = at::empty({2, weight_elem.size(0), weight_elem.size(1)}, weight_elem.options().dtype(dt));
    both.select(0, 0).copy_(weight_elem);
    both.select(0, 1).copy_(weight_hyper);
    w_e = both.select(0, 0);
    w_h = both.select(0, 1);
  }
  const auto offset_cast = offset ? std::optional<at::Tensor>(cast(*offset)) : std::nullopt;
  return ops::per_example_linear().call(cast(x), w_e, w_h, cast(s), offset_cast);
}

}  // namespace

TORCH_LIBRARY_IMPL(stn_ext, CompositeExplicitAutograd, m) {
  m.impl("per_example_linear", &per_example_linear);
}

TORCH_LIBRARY_IMPL(stn_ext, AutocastCPU, m) {
  m.impl("per_example_linear", &per_example_linear_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(stn_ext, AutocastCUDA, m) {
  m.impl("per_example_linear", &per_example_linear_autocast<c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(stn_ext, CompositeImplicitAutograd, m) {
  m.impl("per_example_linear_backward", &per_example_linear_backward);
}

}  // namespace stn_ext
