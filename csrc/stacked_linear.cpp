// stacked_linear: one GEMM against [W_e; W_h] (per-example STN path). Device generic (ATen's GEMM on
// CPU and CUDA), so it is registered once for CompositeExplicitAutograd.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "op_args.h"

namespace stn_ext {
namespace {

// [W_e; W_h] as a view when weight_hyper directly follows weight_elem in one storage, else a copy.
at::Tensor stacked_weight(const at::Tensor& elem, const at::Tensor& hyper) {
  const bool adjacent = elem.is_contiguous() && hyper.is_contiguous() && elem.numel() > 0 &&
                        hyper.storage().is_alias_of(elem.storage()) &&
                        hyper.storage_offset() == elem.storage_offset() + elem.numel();
  if (adjacent) {
    return elem.as_strided({2 * elem.size(0), elem.size(1)}, {elem.size(1), 1});
  }
  return at::cat({elem, hyper});
}

at::Tensor stacked_linear(const at::Tensor& x, const at::Tensor& weight_elem, const at::Tensor& weight_hyper) {
  check_float(x, "x");
  check_same(weight_elem, "weight_elem", weight_hyper, "weight_hyper");
  TORCH_CHECK(x.device() == weight_elem.device(), "stn_ext: x is on ", x.device(), " but weight_elem is on ",
              weight_elem.device());
  TORCH_CHECK(weight_elem.dim() == 2, "stn_ext: weight_elem must be 2-D (out, in), got ", weight_elem.sizes());
  check_shape(weight_hyper, weight_elem.sizes(), "weight_hyper");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == weight_elem.size(1), "stn_ext: x must have shape (N, ",
              weight_elem.size(1), "), got ", x.sizes());
  return at::linear(x, stacked_weight(weight_elem, weight_hyper));
}

}  // namespace

TORCH_LIBRARY_IMPL(stn_ext, CompositeExplicitAutograd, m) {
  m.impl("stacked_linear", &stacked_linear);
}

}  // namespace stn_ext
