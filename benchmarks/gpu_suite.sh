#!/usr/bin/env bash
# One script for a GPU machine with only its preinstalled packages (torch, triton; no network): installs okdfast
# from this tree, checks the kernels on the GPU, runs the kernel, loader and end-to-end benchmarks and a short
# real training run when data is present, and writes every result under $OUT (or the folder given), in about
# 8 minutes. Each step has its own time limit, so one slow step cannot eat the others' time.
#
#   bash benchmarks/gpu_suite.sh [--dry-run] [OUT_DIR]
#
# --dry-run prints the plan (and checks the scripts it would call exist) without running anything: the CPU test
# tier runs it so the suite cannot rot between GPU sessions.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}}"
mkdir -p "$OUT_DIR"
export OKDFAST_RESULTS_DIR="$OUT_DIR/results"
mkdir -p "$OKDFAST_RESULTS_DIR"
LOG="$OUT_DIR/suite.log"
FAILED=()

# The whole suite stays within SUITE_BUDGET seconds (8 minutes by default): a step gets its own limit or what is
# left of the budget, whichever is smaller, and is skipped (and reported) when too little is left.
SUITE_BUDGET="${SUITE_BUDGET:-480}"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local left=$((SUITE_BUDGET - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$DRY" != 1 ] && [ "$limit" -lt 15 ]; then
    echo "== $name: skipped, ${left}s of the ${SUITE_BUDGET}s suite budget left" | tee -a "$LOG"
    FAILED+=("$name(no time)")
    return 0
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  [ "$DRY" = 1 ] && return 0
  local start=$SECONDS
  if timeout "$limit" "$@" >>"$LOG" 2>&1; then
    echo "   ok in $((SECONDS - start))s" | tee -a "$LOG"
  else
    echo "   FAILED ($?) after $((SECONDS - start))s: see $LOG" | tee -a "$LOG"
    FAILED+=("$name")
  fi
}

for script in benchmarks/bench_loss.py benchmarks/bench_ffm.py benchmarks/bench_loader.py benchmarks/bench_train.py; do
  [ -f "$script" ] || { echo "missing $script" | tee -a "$LOG"; FAILED+=("missing:$script"); }
done

# 1. install from the tree, nothing from the network (torch and triton are the machine's own)
step install 60 python -m pip install --no-deps --no-build-isolation --no-index -e .
step environment 30 bash -c "nvidia-smi; python -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda, torch.cuda.get_device_name())'"
[ "$DRY" = 1 ] || { nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1; python -m okdfast.utils.environment > "$OUT_DIR/environment.json" 2>&1; }

# 2. correctness on the GPU first: nothing is timed that has not been checked
step gpu-tests 180 python -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT_DIR/gpu-tests.xml"

# 3. kernel microbenchmarks, loaders, end to end
step bench_loss 90 python -m benchmarks.bench_loss --quick --dtype bf16 --shapes 128x4x100 4096x4x32768
step bench_ffm 75 python -m benchmarks.bench_ffm --quick
step bench_loader 60 python -m benchmarks.bench_loader --quick
step bench_train 120 python -m benchmarks.bench_train --steps 30 --repeats 3 --warmup 15

# 4. a short real training run when the data set is on the machine
DATA="${OKDFAST_DATA:-shared/data}"
if [ -e "$DATA/cifar100.npz" ] || [ -d "$DATA/cifar-100-python" ]; then
  step train-cifar100 120 python -m okdfast.train --method mde --arch resnet32 --dataset cifar100 --data-dir "$DATA" \
    --epochs 2 --amp --progress off --out "$OUT_DIR/run-mde-resnet32-cifar100"
else
  echo "== train-cifar100: skipped, no CIFAR-100 under $DATA" | tee -a "$LOG"
fi

echo "results in $OUT_DIR" | tee -a "$LOG"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "failed steps: ${FAILED[*]}" | tee -a "$LOG"
  [ "$DRY" = 1 ] && exit 1
  exit 1
fi
