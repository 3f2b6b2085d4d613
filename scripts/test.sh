#!/usr/bin/env bash
# Sets up .venv (scripts/setup_env.sh) and runs the test suite. CUDA tests skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m pytest python_tests -q "$@"
