#!/usr/bin/env bash
# The GPU visits (benchmarks/GPU.md): one command each on a CUDA machine with only its own torch and triton (no
# network, no installs), every row appended to a CSV in OUT_DIR as it is measured, OUT_DIR/summary.txt rewritten
# after every step, at most 8 files in OUT_DIR.
#
#   bash benchmarks/gpu_suite.sh visit1 "$OUT"      # <= 520 s: the headline numbers, most valuable first (= visit)
#   bash benchmarks/gpu_suite.sh visit2 "$OUT"      # <= 520 s: every kernel case and teacher form, loaders, GPU tests
#   bash benchmarks/gpu_suite.sh visit3 "$OUT"      # <= 520 s: CUDA defaults, a short real-data run, ablations
#   bash benchmarks/gpu_suite.sh --dry-run VISIT    # the plan: steps, limits, what each limit holds, files back
#   bash benchmarks/gpu_suite.sh --cpu VISIT DIR    # the rehearsal on a CPU: every step with tiny shapes
#
# The runner is benchmarks/suite.py (standard library only); $PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
exec "$PY" -m benchmarks.suite --python "$PY" "$@"
