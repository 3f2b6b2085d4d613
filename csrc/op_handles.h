// Typed handles of the stn_ext ops, for C++ code that calls them through the dispatcher (the layer ops,
// the ops' autograd, the per-example linear op): each looked up once, on first use.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace stn_ext {
namespace ops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

inline const auto& gate() {
  static const auto op = find<Tensor(const Tensor&, const Tensor&, const Tensor&)>("stn_ext::gate");
  return op;
}

inline const auto& gate_backward() {
  static const auto op =
      find<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&)>("stn_ext::gate_backward");
  return op;
}

inline const auto& per_example_linear() {
  static const auto op = find<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const OptTensor&)>("stn_ext::per_example_linear");
  return op;
}

inline const auto& per_example_linear_backward() {
  static const auto op = find<std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, std::array<bool, 3>)>(
      "stn_ext::per_example_linear_backward");
  return op;
}

inline const auto& per_example_epilogue() {
  static const auto op = find<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, int64_t, bool)>(
      "stn_ext::per_example_epilogue");
  return op;
}

inline const auto& per_example_epilogue_backward() {
  static const auto op = find<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t,
                                                                 bool)>("stn_ext::per_example_epilogue_backward");
  return op;
}

}  // namespace ops
}  // namespace stn_ext
