#!/usr/bin/env bash
# GPU checks of the loaders (okdfast/data: --loader gpu | dali | ffcv | torch): what a CPU-only machine cannot
# verify. Run from the repository root on a CUDA machine (~4 min on an H100/H200 with only torch + triton; DALI and
# FFCV steps run where their packages are installed, and are skipped with the install line otherwise):
#
#     bash benchmarks/gpu_checks/loader.sh            # correctness + kernel + quick loader benchmark
#     FULL=1 bash benchmarks/gpu_checks/loader.sh     # + the full benchmark (50k / 90k / 180k) and the train table
#
# 1. The fused Triton kernel (kernels/augment.py) compiled for sm_90 (no GPU needed: ptxas -v, registers, spills).
# 2. Correctness on CUDA: every loader delivers on the device, fp32 channels-last and bf16 contiguous, equal to the
#    CPU torch reference batch for batch (tests/test_loaders.py -m gpu); the CPU tests of the loaders (the kernel
#    in the interpreter included); auto picks gpu on CUDA.
# 3. The kernel alone: fused vs the PyTorch path at batch 128 / 512 / 2048, GB/s (H200 HBM3e: ~4.8 TB/s; at these
#    sizes the kernel is launch-bound, so look at us per batch: a few us expected) -> results/augment.csv.
# 4. Loader throughput, images/s of each loader at CIFAR-100 / CINIC-10 shapes, ratio to torch
#    -> results/loader.csv and results/loader_cuda.png. Expected: gpu >> dali > torch; the gpu loader should
#    sustain well above 1M img/s at batch 128 (a ResNet-32 MDE step on an H200 consumes ~30-50k img/s).
# What to look at: all tests pass; vs_torch of gpu; no spill; us per batch of the fused kernel.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -c "import torch; assert torch.cuda.is_available(), 'needs a CUDA device'; print(torch.cuda.get_device_name())"
unset TRITON_INTERPRET OKDFAST_FORCE_TRITON
WORKERS="${WORKERS:-$(python -c 'import os; print(min(os.cpu_count(), 16))')}"
python -c "import nvidia.dali" 2>/dev/null || echo "note: DALI not installed: pip install nvidia-dali-cuda130 (dali skipped)"
python -c "import ffcv" 2>/dev/null || echo "note: FFCV not installed: pip install ffcv numba opencv-python-headless (ffcv skipped)"

echo "== 1. compile the fused augmentation kernel for sm_90"
python benchmarks/gpu_checks/compile_augment.py --arch 90

echo "== 2. correctness on CUDA"
python -m pytest -q -m gpu tests/test_loaders.py -p no:cacheprovider
python -m pytest -q tests/test_loaders.py tests/test_loaders_dali.py tests/test_loaders_ffcv.py -p no:cacheprovider

echo "== 3. the fused kernel vs the PyTorch path"
python -m benchmarks.bench_loader --kernel

echo "== 4. loader throughput"
if [[ "${FULL:-0}" == "1" ]]; then
    python -m benchmarks.bench_loader --workers "$WORKERS"
    python -m benchmarks.bench_loader --train --workers "$WORKERS"
else
    python -m benchmarks.bench_loader --quick --workers "$WORKERS"
fi
