#!/usr/bin/env bash
# GPU checks of the fused losses (okdfast::online_kd_loss, okdfast::classifier_diversity_loss): what a CPU-only
# machine cannot verify. Run from the repository root on a CUDA machine:
#
#     bash benchmarks/gpu_checks/loss.sh            # correctness + quick benchmark (~5 min on an H100/H200)
#     FULL=1 bash benchmarks/gpu_checks/loss.sh     # + every benchmark shape, bf16 and fp32, all three configs
#
# 1. The compiled kernels (not the interpreter) against the reference on CUDA: the CPU test cases plus C = 32768,
#    K = 8, float64, non-contiguous fp16; block-size overrides; torch.compile(fullgraph=True) with inductor on
#    CUDA; opcheck; the label check and its OKDFAST_CHECK_TARGETS=0 NaN fallback; the CD kernel.
# 2. The benchmark: fused vs eager vs torch.compile, rows into benchmarks/results/loss.csv, plot loss_cuda.png.
#    Every implementation is validated against the eager reference before it is timed.
# 3. Registers / spills: benchmarks/gpu_checks/compile_kernels.py (ptxas -v, runs on any machine, no GPU needed).
# What to look at: all tests pass; the fwd+bwd speed-up of 'fused' over 'reference' and 'compiled' in the printed
# table, and its GB/s against the GPU's DRAM bandwidth for the large shapes (4096x4x32768 moves 2x1 GiB in bf16).
set -euo pipefail
cd "$(dirname "$0")/../.."
python -c "import torch; assert torch.cuda.is_available(), 'needs a CUDA device'; print(torch.cuda.get_device_name())"
unset TRITON_INTERPRET OKDFAST_FORCE_TRITON

echo "== 1. correctness on CUDA"
python -m pytest -q -m gpu tests/test_online_kd_op.py tests/test_classifier_diversity_op.py
python -m pytest -q tests/test_online_kd_op.py tests/test_classifier_diversity_op.py -k "not interpreter_suite"

echo "== 2. benchmark"
if [[ "${FULL:-0}" == "1" ]]; then
    python benchmarks/bench_loss.py --config mde default dml --dtype bf16 fp32
else
    python benchmarks/bench_loss.py --dtype bf16 fp32 --shapes 128x4x10 128x4x100 1024x4x1000 4096x4x32768
fi
# Registers / spills per specialisation need no GPU (run anywhere): python benchmarks/gpu_checks/compile_kernels.py
