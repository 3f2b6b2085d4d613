// The op boundary, shared by the CPU and CUDA kernels: argument checks with messages that name the
// argument, then contiguous inputs and allocated outputs (prepare_*), so a kernel only computes.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace stn_ext {

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "stn_ext: ", name,
              " must be a floating-point tensor (float32, float64, float16 or bfloat16), got ",
              t.scalar_type());
}

inline void check_same(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                       const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "stn_ext: ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; move them to one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "stn_ext: ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; cast them to one dtype");
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "stn_ext: ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

inline void check_device(const at::Tensor& t, c10::DeviceType type, const char* name) {
  TORCH_CHECK(t.device().type() == type, "stn_ext: ", name, " must be a ", c10::DeviceTypeName(type),
              " tensor in this kernel, got ", t.device());
}

// Checks shared by the CPU and CUDA kernels of each op; they return the sizes the kernels need.
struct GateSizes {
  int64_t rows, cols;
};

inline GateSizes check_gate(const at::Tensor& elem, const at::Tensor& hyper, const at::Tensor& scale,
                            const char* elem_name = "elem") {
  check_float(elem, elem_name);
  check_same(elem, elem_name, hyper, "hyper");
  check_same(elem, elem_name, scale, "scale");
  TORCH_CHECK(elem.dim() >= 1, "stn_ext: ", elem_name, " must have at least one dimension");
  check_shape(hyper, elem.sizes(), "hyper");
  check_shape(scale, {elem.size(0)}, "scale");
  const int64_t rows = elem.size(0);
  return {rows, rows == 0 ? 0 : elem.numel() / rows};
}

struct EpilogueSizes {
  int64_t batch, out, positions, per_group;
};

// o is the stacked GEMM/conv output (2*out channels) or, with stacked = false, a tensor shaped like the
// layer output (out channels): the h half the forward kept, or the incoming gradient.
inline EpilogueSizes check_epilogue(const at::Tensor& o, const at::Tensor& s, int64_t groups,
                                    bool channels_last, const char* o_name = "o", bool stacked = true) {
  check_float(o, o_name);
  check_same(o, o_name, s, "s");
  TORCH_CHECK(o.dim() == 3, "stn_ext: ", o_name, " must be 3-D (B, P, channels) or (B, channels, P), got ",
              o.sizes());
  TORCH_CHECK(s.dim() == 2, "stn_ext: s must be 2-D (B, out), got ", s.sizes());
  const int64_t batch = o.size(0);
  const int64_t out = s.size(1);
  const int64_t positions = channels_last ? o.size(1) : o.size(2);
  const int64_t channels = channels_last ? o.size(2) : o.size(1);
  const int64_t expected = stacked ? 2 * out : out;
  TORCH_CHECK(groups >= 1 && out % groups == 0, "stn_ext: groups (", groups,
              ") must be positive and divide the output channels (", out, ")");
  TORCH_CHECK(channels == expected, "stn_ext: ", o_name, " must have ", stacked ? "2*out = " : "out = ", expected,
              " channels (out taken from s), got ", channels);
  TORCH_CHECK(s.size(0) == batch, "stn_ext: s has batch size ", s.size(0), " (size(0)) but ", o_name, " has batch size ",
              batch);
  return {batch, out, positions, out / groups};
}

// Shape of the epilogue output (and of the h it keeps): o's shape with out channels instead of 2*out.
inline std::vector<int64_t> epilogue_out_shape(const EpilogueSizes& z, bool channels_last) {
  return channels_last ? std::vector<int64_t>{z.batch, z.positions, z.out}
                       : std::vector<int64_t>{z.batch, z.out, z.positions};
}

// Shape of the stacked output o (and of its gradient): 2*out channels.
inline std::vector<int64_t> epilogue_stacked_shape(const EpilogueSizes& z, bool channels_last) {
  return channels_last ? std::vector<int64_t>{z.batch, z.positions, 2 * z.out}
                       : std::vector<int64_t>{z.batch, 2 * z.out, z.positions};
}

// The epilogue's offset: (B, out) per example, or (out,) shared by the batch. Returns its stride
// between examples (0 when shared).
inline int64_t check_epilogue_offset(const at::Tensor& o, const EpilogueSizes& z,
                                     const std::optional<at::Tensor>& offset) {
  if (!offset) return 0;
  check_same(o, "o", *offset, "offset");
  const bool per_example = offset->dim() == 2 && offset->size(0) == z.batch && offset->size(1) == z.out;
  TORCH_CHECK(per_example || (offset->dim() == 1 && offset->size(0) == z.out), "stn_ext: offset must have shape (B=",
              z.batch, ", out=", z.out, ") or (out=", z.out, ",), got ", offset->sizes());
  return per_example ? z.out : 0;
}

// Positions per example: the product of x's middle dimensions (1 for x of shape (B, in)). Spelled out
// rather than inferred with -1, which an empty batch leaves ambiguous.
inline c10::SymInt positions(const at::Tensor& x) {
  c10::SymInt p = 1;
  for (int64_t d = 1; d + 1 < x.dim(); ++d) p = p * x.sym_size(d);
  return p;
}

// Helpers for optional tensors (biases, t) passed to the kernels.
inline std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

template <typename scalar_t>
const scalar_t* optional_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<scalar_t>() : nullptr;
}

// --- prepared calls: checked, contiguous inputs and allocated outputs ----------------------------

struct GateCall {
  at::Tensor elem, hyper, scale, out;
  GateSizes z;
};

inline GateCall prepare_gate(const at::Tensor& elem, const at::Tensor& hyper, const at::Tensor& scale,
                             c10::DeviceType device) {
  const auto z = check_gate(elem, hyper, scale);
  check_device(elem, device, "elem");
  auto e = elem.contiguous();
  auto out = at::empty_like(e);
  return {e, hyper.contiguous(), scale.contiguous(), out, z};
}

struct GateBackwardCall {
  at::Tensor grad, hyper, scale, grad_hyper, grad_scale;
  GateSizes z;
};

inline GateBackwardCall prepare_gate_backward(const at::Tensor& grad, const at::Tensor& hyper,
                                              const at::Tensor& scale, c10::DeviceType device) {
  const auto z = check_gate(grad, hyper, scale, "grad");
  check_device(grad, device, "grad");
  auto g = grad.contiguous();
  auto grad_hyper = at::empty_like(g);
  auto grad_scale = at::zeros_like(scale, at::MemoryFormat::Contiguous);
  return {g, hyper.contiguous(), scale.contiguous(), grad_hyper, grad_scale, z};
}

struct EpilogueCall {
  at::Tensor o, s, y, h;
  std::optional<at::Tensor> offset;
  int64_t offset_stride;  // between examples: out, or 0 for a shared (out,) offset
  EpilogueSizes z;
};

inline EpilogueCall prepare_epilogue(const at::Tensor& o, const at::Tensor& s,
                                     const std::optional<at::Tensor>& offset, int64_t groups,
                                     bool channels_last, c10::DeviceType device) {
  const auto z = check_epilogue(o, s, groups, channels_last);
  const int64_t offset_stride = check_epilogue_offset(o, z, offset);
  check_device(o, device, "o");
  auto y = at::empty(epilogue_out_shape(z, channels_last), o.options());
  auto h = at::empty(epilogue_out_shape(z, channels_last), o.options());
  return {o.contiguous(), s.contiguous(), y, h, contiguous_or_none(offset), offset_stride, z};
}

struct EpilogueBackwardCall {
  at::Tensor grad, h, s, grad_o, grad_s, grad_sum;
  EpilogueSizes z;
};

inline EpilogueBackwardCall prepare_epilogue_backward(const at::Tensor& grad, const at::Tensor& h,
                                                      const at::Tensor& s, int64_t groups,
                                                      bool channels_last, c10::DeviceType device) {
  const auto z = check_epilogue(h, s, groups, channels_last, "h", /*stacked=*/false);
  check_same(h, "h", grad, "grad");
  check_shape(grad, h.sizes(), "grad");
  check_device(h, device, "h");
  auto grad_o = at::empty(epilogue_stacked_shape(z, channels_last), h.options());
  // Every (example, channel) sum is written by the kernels (zero when there are no positions).
  auto grad_s = at::empty_like(s, at::MemoryFormat::Contiguous);
  auto grad_sum = at::empty_like(s, at::MemoryFormat::Contiguous);
  return {grad.contiguous(), h.contiguous(), s.contiguous(), grad_o, grad_s, grad_sum, z};
}

}  // namespace stn_ext
