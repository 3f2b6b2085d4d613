#!/usr/bin/env bash
# Sets up .venv (scripts/setup_env.sh) and runs the test suite. CUDA tests skip without a GPU; the CUDA
# kernels themselves are tested on the CPU under the SIMT emulator (python_tests/test_simt.py builds
# them once into build/simt), and the layer and reversible suites then run a second time with the
# stn_ext ops routed to those emulated kernels (STN_EXT_SIMT_ROUTED_RUN=0 skips that second run).
# The same under AddressSanitizer: scripts/test_simt_asan.sh (CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m pytest python_tests -q "$@"
if [ "${STN_EXT_SIMT_ROUTED_RUN:-1}" = 1 ]; then
  echo "== the layer and reversible tests again, the ops running the CUDA kernels under the SIMT emulator"
  STN_EXT_SIMT_ROUTE=1 SIMT_SEED=5 python -m pytest python_tests/test_stn_layers.py python_tests/test_stn_recurrent.py \
    python_tests/test_reversible.py -q "$@"
fi
