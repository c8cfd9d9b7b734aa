#!/usr/bin/env bash
# The staged GPU suite (benchmarks/GPU.md): one stage per command on a CUDA machine with only its own torch and
# triton (no network, no installs), results packed into OUT_DIR/<stage>.tar.gz and OUT_DIR/<stage>.txt.
#
#   bash benchmarks/gpu_suite.sh check   "$OUT"     # ~6 min: device facts, kernels vs reference, compile report, GPU tests
#   bash benchmarks/gpu_suite.sh kernels "$OUT"     # ~6 min: bench_loss, bench_loader (+ bench_branches)
#   bash benchmarks/gpu_suite.sh train   "$OUT"     # ~8 min: bench_train, then MDE ResNet-32 K=4 on full CIFAR-10
#   bash benchmarks/gpu_suite.sh --dry-run STAGE    # the plan: what would run, with which limits; writes nothing
#   bash benchmarks/gpu_suite.sh --list             # every stage's plan
#
# The runner is benchmarks/suite.py (standard library only); $PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
exec "$PY" -m benchmarks.suite --python "$PY" "$@"
