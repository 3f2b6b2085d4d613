// In a CPU-only build, every op gets a CUDA kernel that says how to rebuild, instead of the
// dispatcher's generic "could not run ... with arguments from the 'CUDA' backend".
#ifndef STN_EXT_WITH_CUDA
#include <torch/library.h>

namespace stn_ext {
namespace {

void no_cuda(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(),
              ": this stn_ext was built without CUDA, but was given CUDA tensors. Rebuild it with "
              "CUDA: `FORCE_CUDA=1 pip install --no-build-isolation -e .` (needs torch with CUDA and "
              "the CUDA toolkit; set CUDA_HOME to the toolkit root and TORCH_CUDA_ARCH_LIST to your "
              "GPU), or move the tensors to the CPU.");
}

}  // namespace

TORCH_LIBRARY_IMPL(stn_ext, CUDA, m) {
  for (const char* name : {"gate", "gate_backward", "per_example_linear", "per_example_epilogue",
                           "per_example_epilogue_backward", "reversible_step", "reversible_unstep_weights",
                           "reversible_unstep_velocity"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&no_cuda>());
  }
}

}  // namespace stn_ext
#endif
