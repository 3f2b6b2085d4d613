"""Build stn_ext: the CPU kernels always, the CUDA kernels when asked for or possible.

Rule (as xformers does): FORCE_CUDA=1 builds CUDA, FORCE_CUDA=0 never does; otherwise CUDA is built
when torch has CUDA and a CUDA toolkit is found. TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from find_cuda import find_cuda_home, pip_nvidia_dirs  # noqa: E402


def want_cuda(torch_has_cuda, cuda_home):
    force = os.environ.get("FORCE_CUDA")
    if force == "1":
        if cuda_home is None:
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit root.")
        return True
    if force == "0":
        return False
    return torch_has_cuda and cuda_home is not None


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    # cpp_extension reads CUDA_HOME at import time, so set it first.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = want_cuda(torch.version.cuda is not None, CUDA_HOME)
if WITH_CUDA:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

DEBUG = os.environ.get("DEBUG", "0") == "1"


def extension():
    csrc = os.path.join(ROOT, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    cxx = ["-O0" if DEBUG else "-O3", "-std=c++20", "-fdiagnostics-color=always", "-fopenmp"]
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    kwargs = dict(extra_link_args=["-fopenmp"], py_limited_api=True, include_dirs=[csrc])
    if WITH_CUDA:
        sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
        define_macros.append(("STN_EXT_WITH_CUDA", None))
        # -fmad=false: no fused multiply-adds, so the element maths shared with the CPU loops rounds as
        # they do (the kernels are memory-bound; FMA saves nothing there).
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "-fmad=false"]
        kwargs["include_dirs"] += pip_nvidia_dirs("include")
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": nvcc}
        ext = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext = CppExtension
    return ext("stn_ext._C", sources, define_macros=define_macros, **kwargs)


setup(
    name="stn_ext",
    version="0.1.0",
    description="Self-Tuning Network layers and exact reversible learning as fused PyTorch ops",
    packages=find_packages(include=["stn_ext", "stn_ext.*"]),
    ext_modules=[extension()],
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"text": ["rdata>=1.0"]},  # stn_ext.corpus: Jane Austen's novels are R data
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.9",
)
