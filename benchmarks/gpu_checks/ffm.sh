#!/usr/bin/env bash
# GPU checks of the fused FFM attention (okdfast::ffm_fwd / ffm_bwd / ffm_update_running_stats, kernels/ffm.py):
# what a CPU-only machine cannot verify. Run from the repository root on a CUDA machine:
#
#     bash benchmarks/gpu_checks/ffm.sh            # correctness + the goal shape + quick benchmark (~4 min, H100/H200)
#     FULL=1 bash benchmarks/gpu_checks/ffm.sh     # + every architecture shape at batch 128 and 512, fp32 and bf16
#
# 1. The compiled kernels (not the interpreter) against the float64 reference on CUDA: every test of
#    tests/test_ffm_op.py runs its "triton" cases natively on CUDA, plus the gpu tier: every architecture shape at
#    B = 128 and 512, K = 2/4/8 at ResNet-32's, fp32/bf16, channels-last/contiguous; inductor fullgraph on CUDA;
#    a CUDA-graph capture of forward + backward; MDE (ResNet-32, channels-last, bf16 autocast) fused vs eager.
# 2. The goal (issue #4): fwd+bwd >= 2x eager and >= 1.2x torch.compile of the reference at ResNet-32 shapes,
#    batch 128, K = 4 (fp32 and bf16 features). Read the 'x eager' column and compare the compile row's median.
# 3. The benchmark rows into benchmarks/results/ffm.csv (plot ffm_cuda.png); GB/s of kernel A against the GPU's
#    DRAM bandwidth at WRN-20-8, B = 512 (F is 268 MB in fp32: the forward should be near-bandwidth there).
# 4. Registers / spills need no GPU: python benchmarks/gpu_checks/compile_ffm.py (also run here, for the record).
# What to look at if the goal is missed: the launch count in a profile (expect 3 launches forward in training:
# pool_project, head_fwd, running_stats; 2 backward: head_bwd, param_input_bwd) and kernel A's time. Knobs in
# kernels/ffm.py: POOL_WARPS (8), POOL_TILE (4096), HEAD_TILE (2048), DOT_BLOCK (32).
set -euo pipefail
cd "$(dirname "$0")/../.."
python -c "import torch; assert torch.cuda.is_available(), 'needs a CUDA device'; print(torch.cuda.get_device_name())"
unset TRITON_INTERPRET OKDFAST_FORCE_TRITON

echo "== 1. correctness on CUDA"
python -m pytest -q -p no:cacheprovider -m gpu tests/test_ffm_op.py
python -m pytest -q -p no:cacheprovider tests/test_ffm_op.py

echo "== 2. the goal shape: ResNet-32, B=128, K=4"
for dtype in fp32 bf16; do
    python benchmarks/bench_ffm.py --archs resnet32 --batches 128 --branches 4 --dtype "$dtype" --repeats 50
done

echo "== 3. benchmark"
if [[ "${FULL:-0}" == "1" ]]; then
    python benchmarks/bench_ffm.py --dtype fp32
    python benchmarks/bench_ffm.py --dtype bf16
    python benchmarks/bench_ffm.py --layout contiguous --batches 128
else
    python benchmarks/bench_ffm.py --archs resnet32 wrn20_8 --batches 512 --dtype bf16
fi

echo "== 4. registers and spills (ptxas -v)"
python benchmarks/gpu_checks/compile_ffm.py --arch "$(python -c 'import torch; m, n = torch.cuda.get_device_capability(); print(10 * m + n)')"
