"""Training on a CPU: keep freed memory in the process for the next step instead of returning it to the system.

glibc's malloc serves a large block (over its mmap threshold: 128 KiB at first, raised by frees up to 32 MiB) by a
fresh mmap and unmaps it when freed, and trims the heap's free top; so every step's large tensors (a language
model's logits and their gradient: batch x bptt x vocab floats, 28 MiB at 20 x 35 x 10k) come back as new pages,
each zeroed by the kernel on its first touch. Keeping them took bench_lm.py's model from 149 to 105 ms per fixed
weight step on one thread, and Delta-STN from 1.51x to 1.42x fixed's time (bench_step_time.py --protocol lm, 5
rounds, 2026-12-04), with results bit for bit the same. The cost: the process keeps its peak heap until it exits,
as PyTorch's GPU caching allocator does.

The trainer calls ``keep_freed_memory()`` for runs on a CPU; a loop of your own can call it once at its start.
``STN_EXT_KEEP_FREED_MEMORY=0`` leaves malloc's settings alone. Other C libraries (musl, macOS, Windows): nothing
is changed.
"""
import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
ENV = "STN_EXT_KEEP_FREED_MEMORY"

_kept = None


def keep_freed_memory():
    """Set glibc's malloc to keep freed blocks (once per process); True if the settings are in force."""
    global _kept
    if _kept is None:
        _kept = False
        if os.environ.get(ENV, "1") != "0" and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            libc = ctypes.CDLL(None)
            # every block from the heap (none mapped on its own), and the heap's free top kept up to 2 GiB - 1
            _kept = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _kept


__all__ = ["keep_freed_memory", "ENV"]
