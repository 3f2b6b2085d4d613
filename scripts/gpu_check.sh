#!/usr/bin/env bash
# One command for whoever has a GPU (no network needed; about 10 minutes on one H100/H200):
#   bash scripts/gpu_check.sh [OUT_DIR]
# builds stn_ext with CUDA for the card it finds (in place, with the Python on PATH or $PYTHON, which
# must have torch with CUDA and pytest), runs the CUDA tests, then the layer and reversible benchmarks
# on the GPU (each stage under a time limit), and writes everything into one folder (default gpu-check-<UTC time>/): log.txt,
# nvidia-smi.txt, build.log, tests.txt (pytest summary) and junit.xml, bench/ (tables, JSON, chart),
# summary.txt. Send that folder back. Each stage's failure is recorded and the next stage still runs.
# GPU_CHECK_SKIP_BUILD=1 reuses the build in place (a rerun after a successful build).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/log.txt") 2>&1
start=$(date +%s)
status=()
stage() { echo; echo "== $1 ($(( $(date +%s) - start )) s)"; }
record() { status+=("$1: $2"); echo "-- $1: $2"; }
# run NAME SECONDS LOG COMMAND...: runs it with a time limit, records ok / FAILED / TIMED OUT.
run() {
  local name=$1 limit=$2 log=$3; shift 3
  timeout "$limit" "$@" > "$log" 2>&1
  case $? in 0) record "$name" ok ;; 124) record "$name" "TIMED OUT after $limit s" ;; *) record "$name" FAILED ;; esac
  tail -25 "$log"
}

stage "machine"
git rev-parse HEAD 2>/dev/null | tee "$OUT/commit.txt"
nvidia-smi | tee "$OUT/nvidia-smi.txt" || { echo "nvidia-smi failed: no GPU here?"; exit 1; }
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' ')
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())" \
  || { echo "$PY has no torch"; exit 1; }

stage "build with CUDA for compute capability $CAP"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$CAP MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  record build "skipped (GPU_CHECK_SKIP_BUILD=1: the build in place is used)"
elif "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then record build ok
else record build FAILED; tail -40 "$OUT/build.log"; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import stn_ext; assert stn_ext.has_cuda(), 'not built with CUDA'; print('stn_ext built with CUDA')" \
  || record import FAILED

stage "CUDA tests"
# Every test that runs on the GPU: the cuda-parametrised op tests and the CUDA-only tests. The
# emulator's tests are left to CPU machines.
run tests 240 "$OUT/tests.txt" "$PY" -m pytest python_tests -q -rs -p no:cacheprovider -k "cuda and not test_simt" --junitxml="$OUT/junit.xml"

stage "layer benchmarks (float32, bfloat16)"
mkdir -p "$OUT/bench"
# Every case of bench/cases.py: Linear, Conv2d, and the LSTM (nn.LSTM on cuDNN against StnLSTM) and Embedding rows.
run "bench_layers float32" 240 "$OUT/bench/layers-float32.txt" "$PY" bench/bench_layers.py --device cuda --dtype float32 --all --out "$OUT/bench"
run "bench_layers bfloat16" 180 "$OUT/bench/layers-bfloat16.txt" "$PY" bench/bench_layers.py --device cuda --dtype bfloat16 --all --out "$OUT/bench"
run "bench_layers overhead" 90 "$OUT/bench/overhead.txt" "$PY" bench/bench_layers.py --overhead --device cuda --out "$OUT/bench"

stage "reversible benchmark"
run bench_reversible 100 "$OUT/bench/reversible.txt" "$PY" bench/bench_reversible.py --device cuda --out "$OUT/bench"

stage "done"
{ echo "gpu_check $(cat "$OUT/commit.txt" 2>/dev/null) on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(( $(date +%s) - start )) s"
  printf '%s\n' "${status[@]}"; } | tee "$OUT/summary.txt"
echo "results in $OUT"
