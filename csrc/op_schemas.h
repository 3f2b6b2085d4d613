// The op schemas, defined once for the library stn_ext (csrc/stn_ext.cpp) and once more for the
// emulated CUDA kernels' library stn_ext_simt (csrc/testing/simt/stn_ext_simt.cpp).
#pragma once
#include <torch/library.h>

namespace stn_ext {

inline void define_op_schemas(torch::Library& m) {
  // --- STN layer -------------------------------------------------------------------------------
  // W = elem + scale (.)row hyper; elem, hyper of shape (out, ...), scale (out,).
  m.def("gate(Tensor elem, Tensor hyper, Tensor scale) -> Tensor");
  // One pass over grad and hyper: (grad_hyper = scale (.)row grad, grad_scale_i = sum_j grad_ij hyper_ij).
  m.def("gate_backward(Tensor grad, Tensor hyper, Tensor scale) -> (Tensor, Tensor)");
  // Per-example linear layer, x (B, ..., in), s (B, out), offset (B, out) or (out,): returns (y, h).
  // One GEMM gives o = x [W_e; W_h]^T of shape (N, 2*out) (no weight copy when weight_hyper follows
  // weight_elem in memory, as StnLinear stores them); the epilogue below gives y = e + s (.) h + offset
  // of shape (B, ..., out) and h of shape (N, out), the only part of o the backward needs.
  m.def(
      "per_example_linear(Tensor x, Tensor weight_elem, Tensor weight_hyper, Tensor s, Tensor? offset) "
      "-> (Tensor, Tensor)");
  // Its backward given grad = dL/dy: (grad_x, grad_weight_elem, grad_weight_hyper, grad_s); the first
  // three only where output_mask says (else undefined). grad_offset is grad summed over positions.
  m.def(
      "per_example_linear_backward(Tensor grad, Tensor x, Tensor weight_elem, Tensor weight_hyper, Tensor h, "
      "Tensor s, bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // Per-example epilogue. o: (B, P, 2*out) if channels_last else (B, 2*out, P), the GEMM/conv output
  // against the stacked weight (group-interleaved when groups > 1); s: (B, out); offset: the gated
  // bias b_e + t (.) b_h, (B, out), or (out,) when only b_e is there. Returns (y = e + s (.) h + offset,
  // h), both shaped like o with out channels: h is kept for the backward in place of all of o.
  m.def(
      "per_example_epilogue(Tensor o, Tensor s, Tensor? offset, int groups, bool channels_last) "
      "-> (Tensor, Tensor)");
  // Given grad = dL/dy and the kept h: (grad_o = [g | g (.) s] shaped like o, grad_s = sum_P g (.) h,
  // grad_sum = sum_P g = grad of a (B, out) offset).
  m.def(
      "per_example_epilogue_backward(Tensor grad, Tensor h, Tensor s, int groups, bool channels_last) "
      "-> (Tensor, Tensor, Tensor)");

  // --- reversible learning ---------------------------------------------------------------------
  // Exact SGD with momentum in int64 fixed point (value = int * 2^-radix_bits), gamma = gamma_num / 2^16
  // applied as a bijection with a per-element information buffer (head: uint64 bits in int64, count:
  // int32, words: (capacity, N) uint32 bits in int32); see csrc/reversible_math.h. x, v, head, count
  // have view's shape; view is the float copy of x the model reads. status (2,) int64 accumulates
  // [flags, largest stack count]; an element that would overflow (or finds no room) is left untouched
  // and flagged, and the Python side raises. Nothing here synchronises with the device.
  // Forward: v <- gamma v - (1 - gamma) grad; x <- x + lr v; view <- x.
  m.def(
      "reversible_step(Tensor(a!) x, Tensor(b!) v, Tensor(c!) head, Tensor(d!) count, Tensor(e!) words, "
      "Tensor(f!) view, Tensor grad, Tensor(g!) status, float lr, int gamma_num, int radix_bits) -> ()");
  // Reverse of the weight update: x <- x - lr v; view <- x. Returns sum(dx * v) (float64, 0-dim; 0
  // without dx), the gradient of the objective w.r.t. this step's learning rate.
  m.def(
      "reversible_unstep_weights(Tensor(a!) x, Tensor v, Tensor(b!) view, Tensor? dx, Tensor(c!) status, "
      "float lr, int radix_bits) -> Tensor");
  // Reverse of the velocity update given the recomputed grad: v <- (v + (1 - gamma) grad) / gamma
  // exactly. With dv: dv += lr * dx (when dx is given), and returns sum(dv * (v + grad)) with the
  // restored v (float64, 0-dim), the gradient w.r.t. this step's momentum.
  m.def(
      "reversible_unstep_velocity(Tensor(a!) v, Tensor(b!) head, Tensor(c!) count, Tensor(d!) words, "
      "Tensor grad, Tensor? dx, Tensor(e!)? dv, Tensor(f!) status, float lr, int gamma_num, int radix_bits) "
      "-> Tensor");
}

}  // namespace stn_ext
