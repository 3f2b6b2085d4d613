// CUDA kernels of the STN layer ops around the shared maths of stn_math.h. GEMMs and convolutions
// stay in ATen (cuBLAS/cuDNN); these are the element-wise passes fused around them.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "stn_math.h"

namespace stn_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

inline int64_t blocks_for(int64_t n, int64_t per_block = kThreads) {
  // Grid-stride loops cover the rest; cap the grid so huge tensors launch a sane number of blocks.
  return std::max<int64_t>(1, std::min<int64_t>((n + per_block - 1) / per_block, int64_t(1) << 20));
}

template <typename acc_t>
__device__ inline acc_t warp_sum(acc_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void gate_kernel(const scalar_t* __restrict__ elem, const scalar_t* __restrict__ hyper,
                            const scalar_t* __restrict__ scale, scalar_t* __restrict__ out, int64_t n,
                            int64_t cols) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = gate_value<scalar_t, acc_t>(elem[i], hyper[i], static_cast<acc_t>(scale[i / cols]));
  }
}

// One warp per row: lanes stride over the columns (coalesced), then a shuffle reduction.
template <typename scalar_t, typename acc_t>
__global__ void gate_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ hyper,
                                     const scalar_t* __restrict__ scale, scalar_t* __restrict__ grad_hyper,
                                     scalar_t* __restrict__ grad_scale, int64_t rows, int64_t cols) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t r = blockIdx.x * int64_t(blockDim.x / kWarp) + threadIdx.x / kWarp; r < rows; r += warps) {
    const acc_t s = static_cast<acc_t>(scale[r]);
    const int64_t base = r * cols;
    acc_t sum = 0;
    for (int64_t j = lane; j < cols; j += kWarp) {
      sum += gate_backward_value<scalar_t, acc_t>(grad[base + j], hyper[base + j], s, grad_hyper + base + j);
    }
    sum = warp_sum(sum);
    if (lane == 0) grad_scale[r] = static_cast<scalar_t>(sum);
  }
}

template <typename scalar_t, typename acc_t>
__device__ inline acc_t row_bias(const scalar_t* t, const scalar_t* be, const scalar_t* bh, int64_t c, int64_t bc) {
  return epilogue_bias<acc_t>(be ? static_cast<acc_t>(be[c]) : acc_t(0), t ? static_cast<acc_t>(t[bc]) : acc_t(0),
                              bh ? static_cast<acc_t>(bh[c]) : acc_t(0));
}

template <typename scalar_t, typename acc_t>
__global__ void epilogue_kernel(const scalar_t* __restrict__ o, const scalar_t* __restrict__ s,
                                const scalar_t* __restrict__ t, const scalar_t* __restrict__ be,
                                const scalar_t* __restrict__ bh, scalar_t* __restrict__ y, int64_t batch,
                                int64_t out, int64_t P, int64_t per_group, bool channels_last) {
  const int64_t n = batch * out * P;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    // i walks y in memory order, so neighbouring threads touch neighbouring addresses.
    int64_t b, c, p;
    if (channels_last) {
      c = i % out;
      p = (i / out) % P;
      b = i / (out * P);
    } else {
      p = i % P;
      c = (i / P) % out;
      b = i / (out * P);
    }
    const int64_t bc = b * out + c;
    const int64_t ce = elem_channel(c, per_group);
    y[i] = epilogue_value<scalar_t, acc_t>(o[offset3(b, ce, p, 2 * out, P, channels_last)],
                                           o[offset3(b, ce + per_group, p, 2 * out, P, channels_last)],
                                           static_cast<acc_t>(s[bc]), row_bias<scalar_t, acc_t>(t, be, bh, c, bc));
  }
}

// Backward, channels innermost: one thread per (example, channel) walks the positions; neighbouring
// threads read neighbouring channels.
template <typename scalar_t, typename acc_t>
__global__ void epilogue_backward_cl_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ o,
                                            const scalar_t* __restrict__ s, scalar_t* __restrict__ grad_o,
                                            scalar_t* __restrict__ grad_s, scalar_t* __restrict__ grad_sum,
                                            int64_t batch, int64_t out, int64_t P, int64_t per_group) {
  for (int64_t bc = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; bc < batch * out;
       bc += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = bc / out, c = bc % out, ce = elem_channel(c, per_group);
    const acc_t sv = static_cast<acc_t>(s[bc]);
    acc_t ds = 0, gs = 0;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t oe = offset3(b, ce, p, 2 * out, P, true), oh = offset3(b, ce + per_group, p, 2 * out, P, true);
      epilogue_backward_value<scalar_t, acc_t>(grad[offset3(b, c, p, out, P, true)], o[oh], sv, grad_o + oe,
                                               grad_o + oh, &ds, &gs);
    }
    grad_s[bc] = static_cast<scalar_t>(ds);
    grad_sum[bc] = static_cast<scalar_t>(gs);
  }
}

// Backward, positions innermost: one warp per (example, channel), lanes stride over the positions.
template <typename scalar_t, typename acc_t>
__global__ void epilogue_backward_cf_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ o,
                                            const scalar_t* __restrict__ s, scalar_t* __restrict__ grad_o,
                                            scalar_t* __restrict__ grad_s, scalar_t* __restrict__ grad_sum,
                                            int64_t batch, int64_t out, int64_t P, int64_t per_group) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t bc = blockIdx.x * int64_t(blockDim.x / kWarp) + threadIdx.x / kWarp; bc < batch * out; bc += warps) {
    const int64_t b = bc / out, c = bc % out, ce = elem_channel(c, per_group);
    const acc_t sv = static_cast<acc_t>(s[bc]);
    acc_t ds = 0, gs = 0;
    for (int64_t p = lane; p < P; p += kWarp) {
      const int64_t oe = offset3(b, ce, p, 2 * out, P, false), oh = offset3(b, ce + per_group, p, 2 * out, P, false);
      epilogue_backward_value<scalar_t, acc_t>(grad[offset3(b, c, p, out, P, false)], o[oh], sv, grad_o + oe,
                                               grad_o + oh, &ds, &gs);
    }
    ds = warp_sum(ds);
    gs = warp_sum(gs);
    if (lane == 0) {
      grad_s[bc] = static_cast<scalar_t>(ds);
      grad_sum[bc] = static_cast<scalar_t>(gs);
    }
  }
}

at::Tensor gate_cuda(const at::Tensor& elem_in, const at::Tensor& hyper_in, const at::Tensor& scale_in) {
  const auto z = check_gate(elem_in, hyper_in, scale_in);
  check_device(elem_in, c10::kCUDA, "elem");
  const c10::cuda::CUDAGuard guard(elem_in.device());
  const auto elem = elem_in.contiguous(), hyper = hyper_in.contiguous(), scale = scale_in.contiguous();
  auto out = at::empty_like(elem);
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, elem.scalar_type(), "stn_ext::gate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gate_kernel<scalar_t, acc_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        elem.const_data_ptr<scalar_t>(), hyper.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), out.numel(), z.cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gate_backward_cuda(const at::Tensor& grad_in, const at::Tensor& hyper_in,
                                                      const at::Tensor& scale_in) {
  const auto z = check_gate(grad_in, hyper_in, scale_in, "grad");
  check_device(grad_in, c10::kCUDA, "grad");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto grad = grad_in.contiguous(), hyper = hyper_in.contiguous(), scale = scale_in.contiguous();
  auto grad_hyper = at::empty_like(grad);
  auto grad_scale = at::zeros_like(scale);
  if (grad.numel() == 0) return {grad_hyper, grad_scale};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "stn_ext::gate_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gate_backward_kernel<scalar_t, acc_t><<<blocks_for(z.rows, kThreads / kWarp), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), hyper.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
        grad_hyper.mutable_data_ptr<scalar_t>(), grad_scale.mutable_data_ptr<scalar_t>(), z.rows, z.cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_hyper, grad_scale};
}

at::Tensor per_example_epilogue_cuda(const at::Tensor& o_in, const at::Tensor& s_in,
                                     const std::optional<at::Tensor>& t_in,
                                     const std::optional<at::Tensor>& bias_elem_in,
                                     const std::optional<at::Tensor>& bias_hyper_in, int64_t groups,
                                     bool channels_last) {
  const auto z = check_epilogue(o_in, s_in, groups, channels_last);
  check_epilogue_extras(o_in, z, t_in, bias_elem_in, bias_hyper_in);
  check_device(o_in, c10::kCUDA, "o");
  const c10::cuda::CUDAGuard guard(o_in.device());
  const auto o = o_in.contiguous(), s = s_in.contiguous();
  const auto t = contiguous_or_none(t_in), be = contiguous_or_none(bias_elem_in), bh = contiguous_or_none(bias_hyper_in);
  auto y = at::empty(epilogue_out_shape(z, channels_last), o.options());
  if (y.numel() == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "stn_ext::per_example_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    epilogue_kernel<scalar_t, acc_t><<<blocks_for(y.numel()), kThreads, 0, stream>>>(
        o.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), optional_ptr<scalar_t>(t),
        optional_ptr<scalar_t>(be), optional_ptr<scalar_t>(bh), y.mutable_data_ptr<scalar_t>(), z.batch, z.out,
        z.positions, z.per_group, channels_last);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> per_example_epilogue_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& o_in, const at::Tensor& s_in, int64_t groups,
    bool channels_last) {
  const auto z = check_epilogue(o_in, s_in, groups, channels_last);
  check_same(o_in, "o", grad_in, "grad");
  check_shape(grad_in, epilogue_out_shape(z, channels_last), "grad");
  check_device(o_in, c10::kCUDA, "o");
  const c10::cuda::CUDAGuard guard(o_in.device());
  const auto grad = grad_in.contiguous(), o = o_in.contiguous(), s = s_in.contiguous();
  auto grad_o = at::empty_like(o);
  auto grad_s = at::zeros_like(s);
  auto grad_sum = at::zeros_like(s);
  if (grad_o.numel() == 0) return {grad_o, grad_s, grad_sum};
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = z.batch * z.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "stn_ext::per_example_epilogue_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* op = o.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* gop = grad_o.mutable_data_ptr<scalar_t>();
    scalar_t* gsp = grad_s.mutable_data_ptr<scalar_t>();
    scalar_t* gsum = grad_sum.mutable_data_ptr<scalar_t>();
    if (channels_last) {
      epilogue_backward_cl_kernel<scalar_t, acc_t><<<blocks_for(rows), kThreads, 0, stream>>>(
          gp, op, sp, gop, gsp, gsum, z.batch, z.out, z.positions, z.per_group);
    } else {
      epilogue_backward_cf_kernel<scalar_t, acc_t><<<blocks_for(rows, kThreads / kWarp), kThreads, 0, stream>>>(
          gp, op, sp, gop, gsp, gsum, z.batch, z.out, z.positions, z.per_group);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_o, grad_s, grad_sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(stn_ext, CUDA, m) {
  m.impl("gate", &gate_cuda);
  m.impl("gate_backward", &gate_backward_cuda);
  m.impl("per_example_epilogue", &per_example_epilogue_cuda);
  m.impl("per_example_epilogue_backward", &per_example_epilogue_backward_cuda);
}

}  // namespace stn_ext
