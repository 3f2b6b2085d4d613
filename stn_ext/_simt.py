"""The CUDA kernels of csrc/cuda, run on a CPU: compiled as C++ on the SIMT emulator of csrc/testing/simt
into the op library ``stn_ext_simt`` (the stn_ext schemas once more, with the CUDA kernels registered for
CPU tensors). For the tests; it needs the source tree (an editable install).

    ops = stn_ext._simt.load()        # builds once into build/simt; later runs reuse it (ninja)
    ops.gate(elem, hyper, scale)      # the CUDA kernel, emulated, on CPU tensors
    with stn_ext._simt.routed():      # the stn_ext ops' CPU kernels replaced by the emulated ones, so
        ...                           # layers and the reversible optimiser run the CUDA kernels

Environment: ``STN_EXT_SIMT_ASAN=1`` builds and loads the AddressSanitizer build (build/simt-asan); the
process must have been started with libasan preloaded (``asan_preload()`` says what to preload).
``SIMT_SEED=n`` shuffles block and thread order in every launch (read at each launch).
"""
import contextlib
import os
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SIMT_DIR = os.path.join(CSRC, "testing", "simt")

# The ops with CUDA kernels: the ones the emulated library implements and routed() replaces.
OPS = (
    "gate",
    "gate_backward",
    "per_example_epilogue",
    "per_example_epilogue_backward",
    "reversible_step",
    "reversible_unstep_weights",
    "reversible_unstep_velocity",
)

CXXFLAGS = ["-std=c++20", "-O2", "-DSTN_EXT_SIMT", "-Wall", "-Wno-unknown-pragmas"]
ASAN_FLAGS = ["-fsanitize=address", "-fsanitize-sections=simt_shared", "-fno-omit-frame-pointer"]

_loaded = None
build_seconds = None  # how long the last load() took to build (or to find the build up to date)


def asan_requested():
    return os.environ.get("STN_EXT_SIMT_ASAN") == "1"


def asan_preload():
    """What the ASan build needs preloaded (LD_PRELOAD) into the Python process: libasan, and libstdc++
    (else ASan finds no __cxa_throw to intercept, as Python does not link it, and the first C++
    exception aborts)."""
    libs = []
    for lib in ("libasan.so", "libstdc++.so.6"):
        out = subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True, text=True, check=True)
        libs.append(os.path.realpath(out.stdout.strip()))
    return " ".join(libs)


def _check_sources():
    if not os.path.isfile(os.path.join(SIMT_DIR, "simt.h")):
        raise RuntimeError(f"stn_ext._simt: the emulator sources are not at {SIMT_DIR} (it needs the source tree)")


def build(asan=None, verbose=False):
    """Builds (or finds up to date) the emulated library and loads it; returns its path."""
    from torch.utils import cpp_extension

    _check_sources()
    asan = asan_requested() if asan is None else asan
    name = "stn_ext_simt_asan" if asan else "stn_ext_simt"
    build_dir = os.path.join(ROOT, "build", "simt-asan" if asan else "simt")
    os.makedirs(build_dir, exist_ok=True)
    sources = [os.path.join(SIMT_DIR, f) for f in ("stn_ext_simt.cpp", "stn_cuda_simt.cpp", "reversible_cuda_simt.cpp")]
    cflags = CXXFLAGS + (ASAN_FLAGS if asan else [])
    ldflags = ["-fsanitize=address"] if asan else []
    # ninja rebuilds only what changed (headers included); is_python_module=False loads the library
    # with torch.ops.load_library, which registers the ops.
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_include_paths=[os.path.join(SIMT_DIR, "include"), SIMT_DIR, CSRC],
        build_directory=build_dir,
        is_python_module=False,
        is_standalone=False,
        verbose=verbose,
    )
    return os.path.join(build_dir, name + ".so")


def load(verbose=False):
    """torch.ops.stn_ext_simt, built on first use (see build())."""
    global _loaded, build_seconds
    if _loaded is None:
        if asan_requested() and "libasan" not in os.environ.get("LD_PRELOAD", ""):
            raise RuntimeError(
                "stn_ext._simt: STN_EXT_SIMT_ASAN=1 needs the process started with "
                f"LD_PRELOAD={asan_preload()} (and ASAN_OPTIONS=detect_leaks=0)")
        start = time.monotonic()
        build(verbose=verbose)
        build_seconds = time.monotonic() - start
        _loaded = torch.ops.stn_ext_simt
    return _loaded


@contextlib.contextmanager
def grid_cap(cap):
    """Within the block, grid-stride kernels launch at most `cap` blocks (the loops do the rest)."""
    ops = load()
    old = ops.set_grid_cap(cap)
    try:
        yield
    finally:
        ops.set_grid_cap(old)


def route():
    """Replaces the CPU kernels of the stn_ext ops that have CUDA kernels by the emulated CUDA kernels;
    returns the registration (unroute(lib) or lib._destroy() restores the CPU kernels)."""
    import warnings

    ops = load()
    lib = torch.library.Library("stn_ext", "IMPL")  # noqa: TOR901
    for name in OPS:
        target = getattr(ops, name)

        def kernel(*args, _target=target):
            return _target(*args)

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
            lib.impl(name, kernel, "CPU")
    return lib


def unroute(lib):
    lib._destroy()


@contextlib.contextmanager
def routed():
    lib = route()
    try:
        yield
    finally:
        unroute(lib)
