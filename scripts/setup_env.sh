#!/usr/bin/env bash
# Creates .venv (if missing), installs the dependencies and builds stn_ext into it (editable).
# CUDA kernels are built when torch has CUDA and a CUDA toolkit is found, or when FORCE_CUDA=1;
# FORCE_CUDA=0 builds the CPU kernels alone (seconds instead of minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "is ignored" || true
python -m pip install -q -r requirements.txt 2>&1 | grep -v "is ignored" || true
python -c "import torch" # fail here, clearly, if torch did not install
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "building stn_ext (FORCE_CUDA=${FORCE_CUDA:-auto}, MAX_JOBS=$MAX_JOBS) ..."
python -m pip install -q --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
python - <<'PY'
import stn_ext, torch
if not stn_ext.has_cuda():
    print("stn_ext", stn_ext.__version__, "built with the CPU kernels only")
elif torch.cuda.is_available():
    print("stn_ext", stn_ext.__version__, "built with CUDA kernels;", torch.cuda.device_count(), "GPU(s) found")
else:
    print("stn_ext", stn_ext.__version__, "built with CUDA kernels, but no GPU was found: the CPU kernels run")
PY
