// The library stn_ext_simt: the stn_ext op schemas once more, for the CUDA kernels of csrc/cuda compiled
// as C++ on the SIMT emulator (*_cuda_simt.cpp) and run on CPU tensors; plus the emulator's
// test knobs. Built and loaded by stn_ext/_simt.py.
#include <torch/library.h>

#include "cuda/launch.h"
#include "op_schemas.h"

namespace {

// Sets the grid cap of the grid-stride kernels (0: the device default); returns the previous setting.
int64_t set_grid_cap(int64_t cap) {
  TORCH_CHECK(cap >= 0, "stn_ext_simt: the grid cap must be >= 0 (0 = default), got ", cap);
  return ::simt::grid_cap_override().exchange(cap);
}

// Kernel launches so far in this process.
int64_t launches() { return ::simt::launch_count().load(); }

}  // namespace

TORCH_LIBRARY(stn_ext_simt, m) {
  stn_ext::define_op_schemas(m);
  m.def("set_grid_cap(int cap) -> int", &set_grid_cap);
  m.def("launches() -> int", &launches);
}
