// CUDA kernels of exact reversible SGD with momentum: one thread per element around the element maths
// of reversible_math.h (the same code the CPU loop runs, so both give the same bits). Flags and the
// largest changed stack count go to status by atomics only when there is something to report (rare);
// float64 partial sums are written per block and summed afterwards in a fixed order (deterministic).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launch.h"
#include "reversible_checks.h"
#include "reversible_math.h"

namespace stn_ext {
namespace {

constexpr int kThreads = 256;

template <typename T, typename Op>
__device__ inline T block_reduce(T value, Op op, T* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) value = op(value, __shfl_down_sync(0xffffffffu, value, o));
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kThreads / 32 ? shared[lane] : T(0);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) value = op(value, __shfl_down_sync(0xffffffffu, value, o));
  }
  __syncthreads();
  return value;  // valid in thread 0
}

struct SumOp {
  __device__ double operator()(double a, double b) const { return a + b; }
};

// Flags and the largest changed stack count into status: flags (rare) by the threads that have them;
// the count by one atomic per warp, and only when it exceeds what status already holds (usually
// nothing changed, so no atomics at all).
__device__ inline void report(unsigned long long flags, int max_count, int64_t* status) {
  if (flags) atomicOr(reinterpret_cast<unsigned long long*>(status), flags);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const int other = __shfl_xor_sync(0xffffffffu, max_count, o);
    max_count = other > max_count ? other : max_count;
  }
  if ((threadIdx.x % 32) == 0 && max_count > 0 &&
      static_cast<long long>(max_count) > *reinterpret_cast<volatile long long*>(status + 1)) {
    atomicMax(reinterpret_cast<unsigned long long*>(status + 1), static_cast<unsigned long long>(max_count));
  }
}

__device__ inline void write_sum(double sum, double* partial) {
  __shared__ double ss[kThreads / 32];
  sum = block_reduce(sum, SumOp(), ss);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

template <typename scalar_t>
__global__ void step_kernel(int64_t* __restrict__ x, int64_t* __restrict__ v, uint64_t* __restrict__ head,
                            int32_t* __restrict__ count, uint32_t* __restrict__ words, scalar_t* __restrict__ view,
                            const scalar_t* __restrict__ grad, int64_t* __restrict__ status, int64_t n,
                            int64_t capacity, rev::Params p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  unsigned long long flags = 0;
  int mc = 0;
  if (i < n) {
    flags = rev::step_element<scalar_t>(x + i, v + i, head + i, count + i, words + i, n, capacity, view + i,
                                        grad[i], p, &mc);
  }
  report(flags, mc, status);
}

template <typename scalar_t>
__global__ void unstep_weights_kernel(int64_t* __restrict__ x, const int64_t* __restrict__ v,
                                      scalar_t* __restrict__ view, const scalar_t* __restrict__ dx,
                                      int64_t* __restrict__ status, double* __restrict__ partial, int64_t n,
                                      rev::Params p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  unsigned long long flags = 0;
  double sum = 0.0;
  if (i < n) {
    const int64_t vi = v[i];
    if (dx) sum = static_cast<double>(dx[i]) * (rev::to_double(vi) * p.inv_scale);
    flags = rev::unstep_weights_element<scalar_t>(x + i, vi, view + i, p);
  }
  report(flags, 0, status);
  if (partial) write_sum(sum, partial);
}

template <typename scalar_t>
__global__ void unstep_velocity_kernel(int64_t* __restrict__ v, uint64_t* __restrict__ head,
                                       int32_t* __restrict__ count, uint32_t* __restrict__ words,
                                       const scalar_t* __restrict__ grad, const scalar_t* __restrict__ dx,
                                       scalar_t* __restrict__ dv, int64_t* __restrict__ status,
                                       double* __restrict__ partial, int64_t n, int64_t capacity, rev::Params p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  unsigned long long flags = 0;
  int mc = 0;
  double sum = 0.0;
  if (i < n) {
    const double g = static_cast<double>(grad[i]);
    flags = rev::unstep_velocity_element(v + i, head + i, count + i, words + i, n, capacity, g, p, &mc);
    if (dv) {
      double d = static_cast<double>(dv[i]);
      if (dx) {
        d = rev::adjoint_velocity(d, p.lr, static_cast<double>(dx[i]));
        dv[i] = static_cast<scalar_t>(d);
        d = static_cast<double>(dv[i]);
      }
      sum = d * (rev::to_double(v[i]) * p.inv_scale + g);
    }
  }
  report(flags, mc, status);
  if (partial) write_sum(sum, partial);
}

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

void reversible_step_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& head, const at::Tensor& count,
                          const at::Tensor& words, const at::Tensor& view, const at::Tensor& grad_in,
                          const at::Tensor& status, double lr, int64_t gamma_num, int64_t radix_bits) {
  const int64_t capacity = check_step(x, v, head, count, words, view, grad_in, status, kCudaKernelDevice);
  const rev::Params p = check_scalars(lr, gamma_num, radix_bits);
  const c10::cuda::CUDAGuard guard(view.device());
  const auto grad = grad_in.contiguous();
  const int64_t n = view.numel();
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, view.scalar_type(), "stn_ext::reversible_step", [&] {
    launch_kernel(step_kernel<scalar_t>, blocks_for(n), kThreads, 0, stream,
        x.mutable_data_ptr<int64_t>(), v.mutable_data_ptr<int64_t>(),
        reinterpret_cast<uint64_t*>(head.mutable_data_ptr<int64_t>()), count.mutable_data_ptr<int32_t>(),
        reinterpret_cast<uint32_t*>(words.mutable_data_ptr<int32_t>()), view.mutable_data_ptr<scalar_t>(),
        grad.const_data_ptr<scalar_t>(), status.mutable_data_ptr<int64_t>(), n, capacity, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor reversible_unstep_weights_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& view,
                                          const std::optional<at::Tensor>& dx_in, const at::Tensor& status,
                                          double lr, int64_t radix_bits) {
  check_unstep_weights(x, v, view, dx_in, status, kCudaKernelDevice);
  const rev::Params p = check_scalars(lr, rev::kDen, radix_bits);
  const c10::cuda::CUDAGuard guard(view.device());
  const auto vc = v.contiguous();
  const auto dx = contiguous_or_none(dx_in);
  const int64_t n = view.numel();
  const int64_t blocks = blocks_for(n);
  auto partial = at::zeros({dx ? blocks : 0}, view.options().dtype(at::kDouble));
  if (n > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, view.scalar_type(), "stn_ext::reversible_unstep_weights", [&] {
      launch_kernel(unstep_weights_kernel<scalar_t>, blocks, kThreads, 0, stream,
          x.mutable_data_ptr<int64_t>(), vc.const_data_ptr<int64_t>(), view.mutable_data_ptr<scalar_t>(),
          dx ? dx->const_data_ptr<scalar_t>() : nullptr, status.mutable_data_ptr<int64_t>(),
          dx ? partial.mutable_data_ptr<double>() : nullptr, n, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return partial.sum();
}

at::Tensor reversible_unstep_velocity_cuda(const at::Tensor& v, const at::Tensor& head, const at::Tensor& count,
                                           const at::Tensor& words, const at::Tensor& grad_in,
                                           const std::optional<at::Tensor>& dx_in,
                                           const std::optional<at::Tensor>& dv, const at::Tensor& status,
                                           double lr, int64_t gamma_num, int64_t radix_bits) {
  const int64_t capacity = check_unstep_velocity(v, head, count, words, grad_in, dx_in, dv, status, kCudaKernelDevice);
  const rev::Params p = check_scalars(lr, gamma_num, radix_bits);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto grad = grad_in.contiguous();
  const auto dx = contiguous_or_none(dx_in);
  const int64_t n = grad.numel();
  const int64_t blocks = blocks_for(n);
  auto partial = at::zeros({dv ? blocks : 0}, grad.options().dtype(at::kDouble));
  if (n > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "stn_ext::reversible_unstep_velocity", [&] {
      launch_kernel(unstep_velocity_kernel<scalar_t>, blocks, kThreads, 0, stream,
          v.mutable_data_ptr<int64_t>(), reinterpret_cast<uint64_t*>(head.mutable_data_ptr<int64_t>()),
          count.mutable_data_ptr<int32_t>(), reinterpret_cast<uint32_t*>(words.mutable_data_ptr<int32_t>()),
          grad.const_data_ptr<scalar_t>(), dx ? dx->const_data_ptr<scalar_t>() : nullptr,
          dv ? dv->mutable_data_ptr<scalar_t>() : nullptr, status.mutable_data_ptr<int64_t>(),
          dv ? partial.mutable_data_ptr<double>() : nullptr, n, capacity, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return partial.sum();
}

}  // namespace

TORCH_LIBRARY_IMPL(STN_EXT_CUDA_LIBRARY, STN_EXT_CUDA_KEY, m) {
  m.impl("reversible_step", &reversible_step_cuda);
  m.impl("reversible_unstep_weights", &reversible_unstep_weights_cuda);
  m.impl("reversible_unstep_velocity", &reversible_unstep_velocity_cuda);
}

}  // namespace stn_ext
