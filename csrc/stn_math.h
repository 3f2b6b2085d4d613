// Element-wise maths of the STN layer, shared by the CPU loops (csrc/cpu) and the CUDA kernels
// (csrc/cuda), so what the CPU tests check is what the GPU runs. acc_t is the accumulation type:
// float for float16/bfloat16, the scalar type itself for float32/float64.
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

namespace stn_ext {

// Gated weight (shared lam): W_ij = W_e,ij + s_i * W_h,ij.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline scalar_t gate_value(scalar_t elem, scalar_t hyper, acc_t scale) {
  return static_cast<scalar_t>(static_cast<acc_t>(elem) + scale * static_cast<acc_t>(hyper));
}

// Backward of the gate for one element: dW_h = s * dW is written, and the term dW * W_h of the row
// sum ds_i = sum_j dW_ij W_h,ij is returned for the caller to accumulate.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t gate_backward_value(scalar_t grad, scalar_t hyper, acc_t scale,
                                                 scalar_t* grad_hyper) {
  const acc_t g = static_cast<acc_t>(grad);
  *grad_hyper = static_cast<scalar_t>(scale * g);
  return g * static_cast<acc_t>(hyper);
}

// Per-example epilogue: the GEMM/conv against [W_e; W_h] gave o = [e | h]; offset is the gated bias
// b_e + t * b_h of the (example, channel), formed outside by one small GEMM.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline scalar_t epilogue_value(scalar_t e, scalar_t h, acc_t s, acc_t offset) {
  return static_cast<scalar_t>(static_cast<acc_t>(e) + s * static_cast<acc_t>(h) + offset);
}

// Backward of the epilogue for one element: G = [g | g * s] is written; the caller accumulates
// ds = sum g * h and gsum = sum g over the spatial positions of the (example, channel).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void epilogue_backward_value(scalar_t grad, scalar_t h, acc_t s,
                                                    scalar_t* grad_e, scalar_t* grad_h,
                                                    acc_t* ds, acc_t* gsum) {
  const acc_t g = static_cast<acc_t>(grad);
  *grad_e = grad;
  *grad_h = static_cast<scalar_t>(g * s);
  *ds += g * static_cast<acc_t>(h);
  *gsum += g;
}

// Layout of o (per-example path). o holds 2*out channels; with conv groups the stacked weight is
// [W_e group 0; W_h group 0; W_e group 1; ...], so channel c of the layer reads o's channel
// elem_channel(c) and elem_channel(c) + out / groups.
C10_HOST_DEVICE inline int64_t elem_channel(int64_t c, int64_t per_group) {
  return (c / per_group) * 2 * per_group + c % per_group;
}

// Offset of (example b, channel c, position p) in a 3-D tensor of `channels` channels and P
// positions, stored (B, P, channels) when channels_last, else (B, channels, P).
C10_HOST_DEVICE inline int64_t offset3(int64_t b, int64_t c, int64_t p, int64_t channels, int64_t P,
                                       bool channels_last) {
  return channels_last ? (b * P + p) * channels + c : (b * channels + c) * P + p;
}

}  // namespace stn_ext
