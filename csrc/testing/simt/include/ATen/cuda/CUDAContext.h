// Stand-in for ATen/cuda/CUDAContext.h when the CUDA kernels are compiled for the SIMT emulator
// (csrc/testing/simt): the stream is a dummy and launches run on the CPU.
#pragma once
#include <c10/util/Exception.h>

#include "simt.h"

namespace at::cuda {
inline ::simt::Stream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace at::cuda

#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  TORCH_CHECK(::simt::last_error().empty(), "emulated CUDA kernel launch failed: ", ::simt::last_error())
