// csrc/cuda/reversible_cuda.cu, unchanged, compiled as C++ on the SIMT emulator: with STN_EXT_SIMT defined,
// csrc/cuda/launch.h launches through simt.h and registers the kernels as stn_ext_simt's CPU kernels,
// and the stand-ins in include/ replace ATen/cuda/CUDAContext.h and c10/cuda/CUDAGuard.h.
#ifndef STN_EXT_SIMT
#error "build this file with -DSTN_EXT_SIMT (stn_ext/_simt.py does)"
#endif
#include "cuda/reversible_cuda.cu"
