#!/usr/bin/env bash
# Sets up .venv (scripts/setup_env.sh) and runs the main demo on scikit-learn's digits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m stn_ext demo "$@"
