// How the CUDA kernels are launched and registered, so the same .cu sources compile two ways:
// with nvcc for a GPU, and (STN_EXT_SIMT defined) as C++ on the SIMT emulator of csrc/testing/simt,
// which runs them on CPU tensors in the tests (the op library stn_ext_simt, stn_ext/_simt.py).
#pragma once

#include <c10/core/DeviceType.h>

#include <cstdint>
#include <utility>

#ifdef STN_EXT_SIMT
#include "simt.h"
#endif

namespace stn_ext {

#ifdef STN_EXT_SIMT
// The device the op boundary checks the tensors are on.
constexpr c10::DeviceType kCudaKernelDevice = c10::kCPU;
using cuda_stream_t = ::simt::Stream;
#else
constexpr c10::DeviceType kCudaKernelDevice = c10::kCUDA;
using cuda_stream_t = cudaStream_t;
#endif

// The one way a kernel is launched: kernel<<<grid, block, shared_bytes, stream>>>(args...) under nvcc,
// the emulator's launch otherwise. The arguments convert to the kernel's parameter types as they do
// at a <<<>>> launch. Check with C10_CUDA_KERNEL_LAUNCH_CHECK() afterwards.
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                          cuda_stream_t stream, Args&&... args) {
#ifdef STN_EXT_SIMT
  ::simt::Launch(grid, block, shared_bytes, stream).run(kernel, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
#endif
}

// The most blocks a grid-stride kernel launches (the loops cover the rest). Under the emulator a test
// lowers it (torch.ops.stn_ext_simt.set_grid_cap), so small inputs take several grid-stride rounds.
inline int64_t grid_cap() {
  constexpr int64_t kDeviceCap = int64_t(1) << 20;
#ifdef STN_EXT_SIMT
  return ::simt::grid_cap(kDeviceCap);
#else
  return kDeviceCap;
#endif
}

}  // namespace stn_ext

// Dynamic shared memory of the launch, typed: `extern __shared__ T name[]` under nvcc. (Plain C++
// cannot give an undefined extern array the launch's storage, so the emulator needs the macro.)
#ifdef STN_EXT_SIMT
#define STN_DYNAMIC_SHARED(T, name) T* name = ::simt::dynamic_shared<T>()
#else
#define STN_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// The library and dispatch key the CUDA kernels register under: the stn_ext ops' CUDA kernels, or
// the emulated build's own ops (stn_ext_simt::*, same schemas) for CPU tensors.
#ifdef STN_EXT_SIMT
#define STN_EXT_CUDA_LIBRARY stn_ext_simt
#define STN_EXT_CUDA_KEY CPU
#else
#define STN_EXT_CUDA_LIBRARY stn_ext
#define STN_EXT_CUDA_KEY CUDA
#endif
