#!/usr/bin/env bash
# The emulated CUDA kernels under AddressSanitizer: builds them with -fsanitize=address into
# build/simt-asan (once; about a minute on 2 cores), then runs the emulator tests and the layer and
# reversible suites with the stn_ext ops routed to them, in a Python with libasan preloaded. An
# out-of-bounds access in a kernel stops the run with ASan's report. Needs .venv (scripts/setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
# libstdc++ too: Python does not link it, and ASan must find its __cxa_throw to intercept at startup.
export STN_EXT_SIMT_ASAN=1 ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD
LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so.6)"
python -m pytest -q -p no:cacheprovider python_tests/test_simt.py "$@"
STN_EXT_SIMT_ROUTE=1 SIMT_SEED=5 python -m pytest -q -p no:cacheprovider python_tests/test_stn_layers.py \
  python_tests/test_reversible.py "$@"
