// The library stn_ext: its op schemas (op_schemas.h), registered once; the CPU and CUDA kernels live
// in csrc/cpu and csrc/cuda, their autograd in csrc/autograd.cpp, the layers composed of them in
// csrc/stn_layers.cpp, and the fake (meta) kernels in stn_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "op_schemas.h"

extern "C" {
// An empty Python module `stn_ext._C`: importing it loads this library and so registers the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
bool with_cuda() {
#ifdef STN_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY(stn_ext, m) {
  // Which build is loaded: true when the CUDA kernels were compiled in.
  m.def("with_cuda() -> bool", &with_cuda);

  stn_ext::define_op_schemas(m);
}
