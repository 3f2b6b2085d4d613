// CUDA kernels of the STN layer ops around the shared maths of stn_math.h. GEMMs and convolutions
// stay in ATen (cuBLAS/cuDNN); these are the element-wise passes fused around them.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launch.h"
#include "op_args.h"
#include "stn_math.h"

namespace stn_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

inline int64_t blocks_for(int64_t n, int64_t per_block = kThreads) {
  // Grid-stride loops cover the rest; cap the grid so huge tensors launch a sane number of blocks.
  return std::max<int64_t>(1, std::min<int64_t>((n + per_block - 1) / per_block, grid_cap()));
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
__global__ void epilogue_kernel(const scalar_t* __restrict__ o, const scalar_t* __restrict__ s,
                                const scalar_t* __restrict__ offset, int64_t offset_stride,
                                scalar_t* __restrict__ y, scalar_t* __restrict__ h_kept, int64_t batch, int64_t out,
                                int64_t P, int64_t per_group, bool channels_last) {
  const int64_t n = batch * out * P;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    // i walks y (and h_kept, shaped alike) in memory order, so neighbouring threads touch neighbouring addresses.
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
    const int64_t ce = elem_channel(c, per_group);
    const acc_t off = offset ? static_cast<acc_t>(offset[b * offset_stride + c]) : acc_t(0);
    const scalar_t h = o[offset3(b, ce + per_group, p, 2 * out, P, channels_last)];
    y[i] = epilogue_value<scalar_t, acc_t>(o[offset3(b, ce, p, 2 * out, P, channels_last)], h,
                                           static_cast<acc_t>(s[b * out + c]), off);
    h_kept[i] = h;
  }
}

// Backward, channels innermost: one thread per (example, channel) walks the positions; neighbouring
// threads read neighbouring channels.
template <typename scalar_t, typename acc_t>
__global__ void epilogue_backward_cl_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ h,
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
      const int64_t i = offset3(b, c, p, out, P, true);  // in grad and h
      epilogue_backward_value<scalar_t, acc_t>(grad[i], h[i], sv, grad_o + oe, grad_o + oh, &ds, &gs);
    }
    grad_s[bc] = static_cast<scalar_t>(ds);
    grad_sum[bc] = static_cast<scalar_t>(gs);
  }
}

// Backward, positions innermost: one warp per (example, channel), lanes stride over the positions.
template <typename scalar_t, typename acc_t>
__global__ void epilogue_backward_cf_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ h,
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
      const int64_t i = offset3(b, c, p, out, P, false);  // in grad and h
      epilogue_backward_value<scalar_t, acc_t>(grad[i], h[i], sv, grad_o + oe, grad_o + oh, &ds, &gs);
    }
    ds = warp_sum(ds);
    gs = warp_sum(gs);
    if (lane == 0) {
      grad_s[bc] = static_cast<scalar_t>(ds);
      grad_sum[bc] = static_cast<scalar_t>(gs);
    }
  }
}

at::Tensor gate_cuda(const at::Tensor& elem, const at::Tensor& hyper, const at::Tensor& scale) {
  auto c = prepare_gate(elem, hyper, scale, kCudaKernelDevice);
  const c10::cuda::CUDAGuard guard(c.elem.device());  // after the checks: elem is on a CUDA device
  const int64_t n = c.out.numel();
  if (n == 0) return c.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.elem.scalar_type(), "stn_ext::gate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_kernel(gate_kernel<scalar_t, acc_t>, blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream(),
        c.elem.const_data_ptr<scalar_t>(), c.hyper.const_data_ptr<scalar_t>(), c.scale.const_data_ptr<scalar_t>(),
        c.out.mutable_data_ptr<scalar_t>(), n, c.z.cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c.out;
}

std::tuple<at::Tensor, at::Tensor> gate_backward_cuda(const at::Tensor& grad, const at::Tensor& hyper,
                                                      const at::Tensor& scale) {
  auto c = prepare_gate_backward(grad, hyper, scale, kCudaKernelDevice);
  const c10::cuda::CUDAGuard guard(c.grad.device());  // after the checks: grad is on a CUDA device
  if (c.grad.numel() == 0) return {c.grad_hyper, c.grad_scale};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.grad.scalar_type(), "stn_ext::gate_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_kernel(gate_backward_kernel<scalar_t, acc_t>, blocks_for(c.z.rows, kThreads / kWarp), kThreads, 0,
        at::cuda::getCurrentCUDAStream(), c.grad.const_data_ptr<scalar_t>(), c.hyper.const_data_ptr<scalar_t>(),
        c.scale.const_data_ptr<scalar_t>(), c.grad_hyper.mutable_data_ptr<scalar_t>(),
        c.grad_scale.mutable_data_ptr<scalar_t>(), c.z.rows, c.z.cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {c.grad_hyper, c.grad_scale};
}

std::tuple<at::Tensor, at::Tensor> per_example_epilogue_cuda(const at::Tensor& o, const at::Tensor& s,
                                                             const std::optional<at::Tensor>& offset, int64_t groups,
                                                             bool channels_last) {
  auto c = prepare_epilogue(o, s, offset, groups, channels_last, kCudaKernelDevice);
  const c10::cuda::CUDAGuard guard(c.o.device());  // after the checks: o is on a CUDA device
  const int64_t n = c.y.numel();
  if (n == 0) return {c.y, c.h};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.o.scalar_type(), "stn_ext::per_example_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_kernel(epilogue_kernel<scalar_t, acc_t>, blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream(),
        c.o.const_data_ptr<scalar_t>(), c.s.const_data_ptr<scalar_t>(), optional_ptr<scalar_t>(c.offset),
        c.offset_stride, c.y.mutable_data_ptr<scalar_t>(), c.h.mutable_data_ptr<scalar_t>(), c.z.batch, c.z.out, c.z.positions, c.z.per_group, channels_last);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {c.y, c.h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> per_example_epilogue_backward_cuda(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& s, int64_t groups, bool channels_last) {
  auto c = prepare_epilogue_backward(grad, h, s, groups, channels_last, kCudaKernelDevice);
  const c10::cuda::CUDAGuard guard(c.h.device());  // after the checks: h is on a CUDA device
  const auto& z = c.z;
  const int64_t rows = z.batch * z.out;
  if (rows == 0) return {c.grad_o, c.grad_s, c.grad_sum};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.h.scalar_type(), "stn_ext::per_example_epilogue_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = c.grad.const_data_ptr<scalar_t>();
    const scalar_t* hp = c.h.const_data_ptr<scalar_t>();
    const scalar_t* sp = c.s.const_data_ptr<scalar_t>();
    scalar_t* gop = c.grad_o.mutable_data_ptr<scalar_t>();
    scalar_t* gsp = c.grad_s.mutable_data_ptr<scalar_t>();
    scalar_t* gsum = c.grad_sum.mutable_data_ptr<scalar_t>();
    if (channels_last) {
      launch_kernel(epilogue_backward_cl_kernel<scalar_t, acc_t>, blocks_for(rows), kThreads, 0, stream,
          gp, hp, sp, gop, gsp, gsum, z.batch, z.out, z.positions, z.per_group);
    } else {
      launch_kernel(epilogue_backward_cf_kernel<scalar_t, acc_t>, blocks_for(rows, kThreads / kWarp), kThreads, 0, stream,
          gp, hp, sp, gop, gsp, gsum, z.batch, z.out, z.positions, z.per_group);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {c.grad_o, c.grad_s, c.grad_sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(STN_EXT_CUDA_LIBRARY, STN_EXT_CUDA_KEY, m) {
  m.impl("gate", &gate_cuda);
  m.impl("gate_backward", &gate_backward_cuda);
  m.impl("per_example_epilogue", &per_example_epilogue_cuda);
  m.impl("per_example_epilogue_backward", &per_example_epilogue_backward_cuda);
}

}  // namespace stn_ext
