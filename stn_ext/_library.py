"""Loads the compiled library (which registers the stn_ext ops) and says which build it is."""
import os

import torch

_LIBRARY = os.environ.get("STN_EXT_LIBRARY")
if _LIBRARY:
    # A library built elsewhere (for example by CMakeLists.txt) instead of the package's own.
    torch.ops.load_library(_LIBRARY)
else:
    from stn_ext import _C  # noqa: F401

_WITH_CUDA = bool(torch.ops.stn_ext.with_cuda())

BUILD_HINT = (
    "this stn_ext was built without CUDA; rebuild with `FORCE_CUDA=1 pip install --no-build-isolation -e .` "
    "(needs torch with CUDA and the CUDA toolkit; set CUDA_HOME and TORCH_CUDA_ARCH_LIST), or use CPU tensors"
)


def has_cuda() -> bool:
    """True when the loaded stn_ext build has CUDA kernels (else CUDA tensors get a clear error)."""
    return _WITH_CUDA


def check_device_supported(*tensors):
    """Raise a clear error when CUDA tensors reach a CPU-only build."""
    if not _WITH_CUDA:
        for t in tensors:
            if t is not None and t.is_cuda:
                raise RuntimeError("stn_ext: " + BUILD_HINT)
