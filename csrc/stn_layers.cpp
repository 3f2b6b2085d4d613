// The STN layers (MacKay et al. 2019) as ops of their own, composed in C++ of ATen's GEMM/conv and the
// fused ops: one call from Python per layer, the argument checks once, here, with messages that name
// the argument (a Python composition cost ~8 us of checks and ~4 us per op it called).
//   shared lam (n,):        W = gate(W_e, W_h, V lam), b = gate(b_e, b_h, C lam); then one GEMM/conv;
//   per-example lam (B, n): one GEMM/conv against [W_e; W_h] and the fused epilogue
//                           y = e + s (.) h + offset, s = lam V^T, offset = b_e + (lam C^T) (.) b_h.
// They are CompositeImplicitAutograd: autograd, autocast and torch.compile see the ops they call.
// torch.func transforms and forward-mode AD take the pure-PyTorch reference instead (stn_ext/functional.py),
// after check_layer_args, the same checks on stand-ins of the arguments.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <optional>
#include <sstream>
#include <string>

#include "op_args.h"
#include "op_handles.h"

namespace stn_ext {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// --- messages in Python's spelling: the user called a Python function --------------------------

std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string py_shape(const Tensor& t) {
  std::ostringstream s;
  s << "(";
  for (int64_t d = 0; d < t.dim(); ++d) s << (d ? ", " : "") << t.sym_size(d);
  s << (t.dim() == 1 ? ",)" : ")");
  return s.str();
}

bool autocast_on(c10::DeviceType type) {
  return at::autocast::is_autocast_available(type) && at::autocast::is_autocast_enabled(type);
}

#define STN_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "stn_ext: ", kind, ": ", __VA_ARGS__)

struct LayerArgs {
  const Tensor& x;
  const Tensor& lam;
  const Tensor& weight_elem;
  const Tensor& weight_hyper;
  const Tensor& hyper_weight;
  const OptTensor& bias_elem;
  const OptTensor& bias_hyper;
  const OptTensor& hyper_bias;
};

// The checks both layers share: devices, dtypes, and the shapes of lam and the parameters.
void check_common(const char* kind, const LayerArgs& a) {
  const std::pair<const char*, const Tensor*> named[] = {
      {"x", &a.x},
      {"lam", &a.lam},
      {"weight_elem", &a.weight_elem},
      {"weight_hyper", &a.weight_hyper},
      {"hyper_weight", &a.hyper_weight},
      {"bias_elem", a.bias_elem ? &*a.bias_elem : nullptr},
      {"bias_hyper", a.bias_hyper ? &*a.bias_hyper : nullptr},
      {"hyper_bias", a.hyper_bias ? &*a.hyper_bias : nullptr}};
  const Tensor& w = a.weight_elem;
  for (const auto& [name, t] : named) {
    STN_CHECK(!t || t->device() == w.device(), name, " is on ", t->device(), " but weight_elem is on ", w.device(),
              "; move them to one device");
  }
  STN_CHECK(at::isFloatingType(a.lam.scalar_type()), "lam must be a floating-point tensor, got ",
            py_dtype(a.lam.scalar_type()));
  if (!autocast_on(a.x.device().type())) {
    for (const auto& [name, t] : named) {
      STN_CHECK(!t || t->scalar_type() == w.scalar_type(), name, " has dtype ", py_dtype(t->scalar_type()),
                " but weight_elem has ", py_dtype(w.scalar_type()), "; cast them to one dtype");
    }
  }
  STN_CHECK(w.dim() >= 1, "weight_elem must have at least one dimension, got shape ", py_shape(w));
  STN_CHECK(a.weight_hyper.sym_sizes() == w.sym_sizes(), "weight_hyper has shape ", py_shape(a.weight_hyper),
            ", expected weight_elem's ", py_shape(w));
  const c10::SymInt out = w.sym_size(0);
  STN_CHECK(a.hyper_weight.dim() == 2 && a.hyper_weight.sym_size(0) == out, "hyper_weight must have shape (out=", out,
            ", n_hyper), got ", py_shape(a.hyper_weight));
  const c10::SymInt n = a.hyper_weight.sym_size(1);
  if (a.lam.dim() == 1) {
    STN_CHECK(a.lam.sym_size(0) == n, "lam has shape ", py_shape(a.lam), " but the layer has n_hyper=", n);
  } else if (a.lam.dim() == 2) {
    STN_CHECK(a.lam.sym_size(1) == n, "lam has shape ", py_shape(a.lam), "; expected (B, n_hyper=", n, ")");
    const bool batched = a.x.dim() >= 2;
    STN_CHECK(batched && a.lam.sym_size(0) == a.x.sym_size(0), "per-example lam has batch size ", a.lam.sym_size(0),
              " (shape[0]) but x has batch size ", batched ? c10::str(a.x.sym_size(0)) : std::string("none"),
              " (x.shape=", py_shape(a.x), ")");
  } else {
    STN_CHECK(false, "lam must have shape (n_hyper,) or (B, n_hyper), got ", py_shape(a.lam));
  }
  for (const auto& [name, t] : {std::pair{"bias_elem", &a.bias_elem}, std::pair{"bias_hyper", &a.bias_hyper}}) {
    STN_CHECK(!*t || ((*t)->dim() == 1 && (*t)->sym_size(0) == out), name, " must have shape (", out, ",), got ",
              py_shape(**t));
  }
  if (a.bias_hyper) {
    STN_CHECK(a.bias_elem.has_value(), "bias_hyper needs bias_elem");
    const bool ok = a.hyper_bias && a.hyper_bias->dim() == 2 && a.hyper_bias->sym_size(0) == out &&
                    a.hyper_bias->sym_size(1) == n;
    STN_CHECK(ok, "bias_hyper needs hyper_bias of shape (", out, ", ", n, "), got ",
              a.hyper_bias ? py_shape(*a.hyper_bias) : std::string("None"));
  }
}

void check_linear_args(const LayerArgs& a) {
  const char* kind = "stn_linear";
  check_common(kind, a);
  STN_CHECK(a.weight_elem.dim() == 2, "weight_elem must be 2-D (out, in), got ", py_shape(a.weight_elem));
  STN_CHECK(a.x.dim() >= 1 && a.x.sym_size(-1) == a.weight_elem.sym_size(1), "x has shape ", py_shape(a.x),
            " but the layer has in_features=", a.weight_elem.sym_size(1));
}

void check_conv_args(const LayerArgs& a, const c10::SymInt& groups) {
  const char* kind = "stn_conv2d";
  check_common(kind, a);
  const Tensor& w = a.weight_elem;
  STN_CHECK(w.dim() == 4, "weight_elem must be 4-D (out, in/groups, kh, kw), got ", py_shape(w));
  STN_CHECK(groups >= 1 && w.sym_size(0) % groups == 0, "groups=", groups,
            " must be positive and divide the output channels (", w.sym_size(0), ")");
  STN_CHECK(a.x.dim() == 4 && a.x.sym_size(1) == w.sym_size(1) * groups, "x has shape ", py_shape(a.x),
            " but the layer expects (B, ", w.sym_size(1) * groups, ", H, W)");
}

#undef STN_CHECK

// --- the composition ---------------------------------------------------------------------------

// The gated weight W_e + (V lam) (.)row W_h of a shared lam.
Tensor gated_weight(const LayerArgs& a) {
  return ops::gate().call(a.weight_elem, a.weight_hyper, at::mv(a.hyper_weight, a.lam));
}

// The gated bias b_e + (C lam) (.) b_h of a shared lam; b_e alone, or none.
OptTensor gated_bias(const LayerArgs& a) {
  if (!a.bias_elem || !a.bias_hyper) return a.bias_elem;
  return ops::gate().call(*a.bias_elem, *a.bias_hyper, at::mv(*a.hyper_bias, a.lam));
}

// The gated bias b_e + (lam C^T) (.) b_h = b_e + lam (C (.)row b_h)^T per example, in one small GEMM (its
// backward is small GEMMs too, no pass over (B, out)); b_e alone, or none.
OptTensor per_example_offset(const LayerArgs& a) {
  if (!a.bias_elem || !a.bias_hyper) return a.bias_elem;
  return at::addmm(*a.bias_elem, a.lam, (*a.hyper_bias * a.bias_hyper->unsqueeze(1)).t());
}

// [W_e; W_h] interleaved by group, so that conv groups see their own halves.
Tensor stacked_conv_weight(const Tensor& elem, const Tensor& hyper, const c10::SymInt& groups) {
  if (groups == 1) return at::cat({elem, hyper});
  const c10::SymInt out = elem.sym_size(0);
  std::vector<c10::SymInt> split{groups, out / groups};
  std::vector<c10::SymInt> stacked{2 * out};
  for (int64_t d = 1; d < elem.dim(); ++d) {
    split.push_back(elem.sym_size(d));
    stacked.push_back(elem.sym_size(d));
  }
  return at::stack({elem.reshape_symint(split), hyper.reshape_symint(split)}, 1).reshape_symint(stacked);
}

Tensor stn_linear(const Tensor& x, const Tensor& lam, const Tensor& weight_elem, const Tensor& weight_hyper,
                  const Tensor& hyper_weight, const OptTensor& bias_elem, const OptTensor& bias_hyper,
                  const OptTensor& hyper_bias) {
  const LayerArgs a{x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem, bias_hyper, hyper_bias};
  check_linear_args(a);
  if (lam.dim() == 1) return at::linear(x, gated_weight(a), gated_bias(a));
  const Tensor s = at::mm(lam, hyper_weight.t());
  return std::get<0>(ops::per_example_linear().call(x, weight_elem, weight_hyper, s, per_example_offset(a)));
}

Tensor conv(const Tensor& x, const Tensor& w, const OptTensor& b, c10::SymIntArrayRef stride,
            c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, const c10::SymInt& groups,
            const std::optional<c10::string_view>& padding_name) {
  if (padding_name) return at::conv2d_symint(x, w, b, stride, *padding_name, dilation, groups);
  return at::conv2d_symint(x, w, b, stride, padding, dilation, groups);
}

// padding_name ('same' or 'valid', as F.conv2d takes them) replaces padding when given.
Tensor stn_conv2d(const Tensor& x, const Tensor& lam, const Tensor& weight_elem, const Tensor& weight_hyper,
                  const Tensor& hyper_weight, const OptTensor& bias_elem, const OptTensor& bias_hyper,
                  const OptTensor& hyper_bias, c10::SymIntArrayRef stride, c10::SymIntArrayRef padding,
                  c10::SymIntArrayRef dilation, c10::SymInt groups, std::optional<c10::string_view> padding_name) {
  const LayerArgs a{x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem, bias_hyper, hyper_bias};
  check_conv_args(a, groups);
  if (lam.dim() == 1) return conv(x, gated_weight(a), gated_bias(a), stride, padding, dilation, groups, padding_name);
  const c10::SymInt out = weight_elem.sym_size(0);
  const Tensor o = conv(x, stacked_conv_weight(weight_elem, weight_hyper, groups), std::nullopt, stride, padding,
                        dilation, groups, padding_name);
  const c10::SymInt B = o.sym_size(0), H = o.sym_size(2), W = o.sym_size(3);
  const bool channels_last = o.is_contiguous(at::MemoryFormat::ChannelsLast) && !o.is_contiguous();
  const Tensor o3 = channels_last ? o.permute({0, 2, 3, 1}).reshape_symint({B, H * W, 2 * out})
                                  : o.reshape_symint({B, 2 * out, H * W});
  const Tensor s = at::mm(lam, hyper_weight.t()).to(o.scalar_type());  // o's dtype differs under autocast
  OptTensor offset = per_example_offset(a);
  if (offset) offset = offset->to(o.scalar_type());
  const int64_t g = groups.guard_int(__FILE__, __LINE__);
  const Tensor y = std::get<0>(ops::per_example_epilogue().call(o3, s, offset, g, channels_last));
  return channels_last ? y.view_symint({B, H, W, out}).permute({0, 3, 1, 2}) : y.view_symint({B, out, H, W});
}

// The layers' checks alone, for the reference path (stand-ins: any tensors of the arguments' shapes,
// dtypes and devices). kind: "stn_linear" or "stn_conv2d".
void check_layer_args(c10::string_view kind, const Tensor& x, const Tensor& lam, const Tensor& weight_elem,
                      const Tensor& weight_hyper, const Tensor& hyper_weight, const OptTensor& bias_elem,
                      const OptTensor& bias_hyper, const OptTensor& hyper_bias, c10::SymInt groups) {
  const LayerArgs a{x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem, bias_hyper, hyper_bias};
  if (kind == "stn_linear") {
    check_linear_args(a);
  } else {
    TORCH_CHECK_VALUE(kind == "stn_conv2d", "stn_ext: check_layer_args: kind must be 'stn_linear' or 'stn_conv2d', got '",
                      kind, "'");
    check_conv_args(a, groups);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stn_ext, m) {
  m.def(
      "stn_linear(Tensor x, Tensor lam, Tensor weight_elem, Tensor weight_hyper, Tensor hyper_weight, "
      "Tensor? bias_elem=None, Tensor? bias_hyper=None, Tensor? hyper_bias=None) -> Tensor");
  m.def(
      "stn_conv2d(Tensor x, Tensor lam, Tensor weight_elem, Tensor weight_hyper, Tensor hyper_weight, "
      "Tensor? bias_elem=None, Tensor? bias_hyper=None, Tensor? hyper_bias=None, SymInt[2] stride=1, "
      "SymInt[2] padding=0, SymInt[2] dilation=1, SymInt groups=1, str? padding_name=None) -> Tensor");
  m.def(
      "check_layer_args(str kind, Tensor x, Tensor lam, Tensor weight_elem, Tensor weight_hyper, Tensor hyper_weight, "
      "Tensor? bias_elem=None, Tensor? bias_hyper=None, Tensor? hyper_bias=None, SymInt groups=1) -> ()");
}

TORCH_LIBRARY_IMPL(stn_ext, CompositeImplicitAutograd, m) {
  m.impl("stn_linear", &stn_linear);
  m.impl("stn_conv2d", &stn_conv2d);
  m.impl("check_layer_args", &check_layer_args);
}

}  // namespace stn_ext
