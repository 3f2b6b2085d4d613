// Argument checks of the reversible-learning ops, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "op_args.h"
#include "reversible_math.h"

namespace stn_ext {

inline void check_exact_state(const at::Tensor& t, const at::Tensor& view, c10::ScalarType dtype,
                              const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, "stn_ext: ", name, " must be a ", dtype, " tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == view.device(), "stn_ext: ", name, " is on ", t.device(), " but view is on ",
              view.device(), "; keep the optimizer state on the parameter's device");
  TORCH_CHECK(t.sizes() == view.sizes(), "stn_ext: ", name, " must have the shape of view ", view.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "stn_ext: ", name, " must be contiguous (it is updated in place)");
}

inline void check_view(const at::Tensor& view, c10::DeviceType type) {
  check_float(view, "view");
  check_device(view, type, "view");
  TORCH_CHECK(view.is_contiguous(), "stn_ext: view must be contiguous (it is updated in place)");
}

inline void check_like_view(const at::Tensor& t, const at::Tensor& view, const char* name) {
  check_same(view, "view", t, name);
  TORCH_CHECK(t.sizes() == view.sizes(), "stn_ext: ", name, " must have the shape of view ", view.sizes(),
              ", got ", t.sizes());
}

inline int64_t check_words(const at::Tensor& words, const at::Tensor& view) {
  TORCH_CHECK(words.scalar_type() == at::kInt, "stn_ext: words must be an int32 tensor, got ",
              words.scalar_type());
  TORCH_CHECK(words.device() == view.device(), "stn_ext: words is on ", words.device(), " but view is on ",
              view.device());
  TORCH_CHECK(words.dim() == 2 && words.size(1) == view.numel(), "stn_ext: words must have shape (capacity, ",
              view.numel(), "), got ", words.sizes());
  TORCH_CHECK(words.is_contiguous(), "stn_ext: words must be contiguous (it is updated in place)");
  return words.size(0);
}

inline void check_status(const at::Tensor& status, const at::Tensor& view) {
  TORCH_CHECK(status.scalar_type() == at::kLong, "stn_ext: status must be an int64 tensor, got ",
              status.scalar_type());
  TORCH_CHECK(status.device() == view.device(), "stn_ext: status is on ", status.device(),
              " but view is on ", view.device());
  TORCH_CHECK(status.dim() == 1 && status.size(0) == 2, "stn_ext: status must have shape (2,), got ",
              status.sizes());
  TORCH_CHECK(status.is_contiguous(), "stn_ext: status must be contiguous (it is updated in place)");
}

inline rev::Params check_scalars(double lr, int64_t gamma_num, int64_t radix_bits) {
  TORCH_CHECK(std::isfinite(lr), "stn_ext: lr must be finite, got ", lr);
  TORCH_CHECK(gamma_num >= 1 && gamma_num <= rev::kDen, "stn_ext: gamma_num must be in [1, ", rev::kDen,
              "] (momentum = gamma_num / ", rev::kDen, "), got ", gamma_num);
  TORCH_CHECK(radix_bits >= 0 && radix_bits <= 62, "stn_ext: radix_bits must be in [0, 62], got ",
              radix_bits);
  return rev::make_params(lr, gamma_num, radix_bits);
}

// reversible_step
inline int64_t check_step(const at::Tensor& x, const at::Tensor& v, const at::Tensor& head,
                          const at::Tensor& count, const at::Tensor& words, const at::Tensor& view,
                          const at::Tensor& grad, const at::Tensor& status, c10::DeviceType type) {
  check_view(view, type);
  check_exact_state(x, view, at::kLong, "x");
  check_exact_state(v, view, at::kLong, "v");
  check_exact_state(head, view, at::kLong, "head");
  check_exact_state(count, view, at::kInt, "count");
  check_like_view(grad, view, "grad");
  check_status(status, view);
  return check_words(words, view);
}

inline void check_optional_like_view(const std::optional<at::Tensor>& t, const at::Tensor& view,
                                     const char* name, bool mutated);

// reversible_unstep_weights
inline void check_unstep_weights(const at::Tensor& x, const at::Tensor& v, const at::Tensor& view,
                                 const std::optional<at::Tensor>& dx, const at::Tensor& status,
                                 c10::DeviceType type) {
  check_view(view, type);
  check_exact_state(x, view, at::kLong, "x");
  TORCH_CHECK(v.scalar_type() == at::kLong && v.device() == view.device() && v.sizes() == view.sizes(),
              "stn_ext: v must be an int64 tensor of view's shape on view's device, got ", v.scalar_type(), " ",
              v.sizes(), " on ", v.device());
  check_optional_like_view(dx, view, "dx", false);
  check_status(status, view);
}

// reversible_unstep_velocity: grad stands in for view (v, head, count take its shape and device).
// Returns the capacity of words.
inline int64_t check_unstep_velocity(const at::Tensor& v, const at::Tensor& head, const at::Tensor& count,
                                     const at::Tensor& words, const at::Tensor& grad,
                                     const std::optional<at::Tensor>& dx, const std::optional<at::Tensor>& dv,
                                     const at::Tensor& status, c10::DeviceType type) {
  check_float(grad, "grad");
  check_device(grad, type, "grad");
  TORCH_CHECK(v.scalar_type() == at::kLong, "stn_ext: v must be an int64 tensor, got ", v.scalar_type());
  TORCH_CHECK(v.sizes() == grad.sizes(), "stn_ext: v must have the shape of grad ", grad.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(v.is_contiguous(), "stn_ext: v must be contiguous (it is updated in place)");
  TORCH_CHECK(v.device() == grad.device(), "stn_ext: v is on ", v.device(), " but grad is on ", grad.device());
  check_exact_state(head, v, at::kLong, "head");
  check_exact_state(count, v, at::kInt, "count");
  const int64_t capacity = check_words(words, v);
  check_status(status, v);
  check_optional_like_view(dx, grad, "dx", false);
  check_optional_like_view(dv, grad, "dv", true);
  return capacity;
}

inline void check_optional_like_view(const std::optional<at::Tensor>& t, const at::Tensor& view,
                                     const char* name, bool mutated) {
  if (!t) return;
  check_like_view(*t, view, name);
  if (mutated) {
    TORCH_CHECK(t->is_contiguous(), "stn_ext: ", name, " must be contiguous (it is updated in place)");
  }
}

}  // namespace stn_ext
