#!/usr/bin/env bash
# The short sweep that picked MDE's CD weight and FFM input on this 2-core CPU (docs/METHOD.md section 3): one
# seed, ResNet-8, 10 epochs (cosine) on the 8,336 exact CIFAR-10 images, tested on their 1,017 test images.
# Resumable: a finished run is skipped, a cut one continues (--resume auto). Usage: bash benchmarks/mde_sweep.sh DATA
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10-exact-subset.npz}
OUT=benchmarks/results/mde-sweep
PY=${PYTHON:-.venv/bin/python}
run() {
  local name=$1; shift
  if [ -f "$OUT/$name/summary.json" ] && grep -q '"finished": true' "$OUT/$name/summary.json"; then return; fi
  "$PY" -m okdfast.train --method mde --arch resnet8 --dataset cifar10 --data-dir "$DATA" --epochs 10 \
    --lr-schedule cosine --seed 0 --out "$OUT/$name" --resume auto --progress off "$@"
  rm -f "$OUT/$name/last.pt" "$OUT/$name/best.pt"
}
run cd-off --cd-weight 0
run cd-1 --cd-weight 1
run cd-3 --cd-weight 3
run cd-10 --cd-weight 10
run ffm-logits-cd-1 --cd-weight 1 --ffm-input sum+logits
run ffm-off-cd-1 --cd-weight 1 --ffm off
