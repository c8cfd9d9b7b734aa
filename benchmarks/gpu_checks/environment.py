"""The prerequisite of every GPU visit: every package any step imports is there, okdfast's kernels import, the device
is seen; then the device's facts and ceilings.

    python -m benchmarks.gpu_checks.environment --require-cuda

Prints one line per fact; on a failure one line naming what broke (``environment: import torchvision failed:
ModuleNotFoundError: ... (needed by: the reference trainer's transforms, ...)``) and exit status 1, so a visit stops
in its first seconds instead of in its fifth step. Writes ``environment.json`` to the results folder, rewritten as
it learns more: the versions of every package, okdfast's run manifest, the device (name, SMs, memory, L2, the
measured copy bandwidth of a 1 GiB device-to-device copy, bytes read + written, and the bf16 matmul rate at 8192^3
that every benchmark reports its GB/s and FLOP/s against), and ``nvidia-smi -q``'s text (its timeout caught and
recorded: a wedged driver tool must not cost the visit).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# every third-party package a visit's steps import, and who needs it (tests/test_gpu_suite.py checks that every
# unguarded third-party import in okdfast/, kernels/, benchmarks/ and tests/ is listed here)
REQUIRED: dict[str, str] = {
    "torch": "everything",
    "triton": "the fused kernels",
    "numpy": "the data sets, full_run",
    "torchvision": "the reference trainer's transforms, CIFAR's downloaders",
    "PIL": "JPEG decoding (full_run decode, cifar10-jpeg.npz)",
    "yaml": "okdfast.config (every training run)",
    "tqdm": "okdfast.run.progress",
    "matplotlib": "the benchmarks' plots",
    "pytest": "the GPU test tier (visit2)",
}
# import-guarded where they are used: a missing one is a skipped row or test, never a failed step
OPTIONAL = ("nvidia.dali", "ffcv", "tensorboard")
NVIDIA_SMI_TIMEOUT_S = 15


def fail(message: str) -> int:
    print(f"environment: {message}", flush=True)
    return 1


def import_all() -> tuple[dict[str, str], str | None]:
    """(package -> version, the first failure as one line or None)."""
    versions: dict[str, str] = {}
    for name, needed_by in REQUIRED.items():
        try:
            module = importlib.import_module(name)
        except Exception as error:  # the one line the visit reports
            return versions, f"import {name} failed: {type(error).__name__}: {error} (needed by: {needed_by})"
        versions[name] = str(getattr(module, "__version__", "?"))
    for name in OPTIONAL:
        try:
            versions[name] = str(getattr(importlib.import_module(name), "__version__", "?"))
        except Exception:
            versions[name] = "absent (optional)"
    try:
        import okdfast.kernels.augment
        import okdfast.kernels.online_kd

        import okdfast
        import okdfast.ops  # noqa: F401  (registers the torch.library ops)
    except Exception as error:
        return versions, f"import okdfast failed ({type(error).__name__}: {error}); was `pip install -e .` run?"
    versions["okdfast"] = str(Path(okdfast.__file__).parent)
    return versions, None


def nvidia_smi() -> str:
    if not shutil.which("nvidia-smi"):
        return "nvidia-smi: not on the PATH"
    try:
        smi = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"nvidia-smi -q: no answer within {NVIDIA_SMI_TIMEOUT_S} s (killed; the visit goes on)"
    except OSError as error:
        return f"nvidia-smi -q: could not run: {error}"
    return smi.stdout + smi.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-cuda", action="store_true", help="fail unless a CUDA device is visible")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    versions, failure = import_all()
    if failure:
        return fail(failure)
    import torch

    print(f"python {sys.version.split()[0]} ({sys.executable})")
    print("packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if args.require_cuda and not torch.cuda.is_available():
        return fail(f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)")

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.harness import device_facts, results_dir
    from okdfast.utils.environment import environment_manifest

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = results_dir(args.results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"manifest": environment_manifest(device), "packages": versions, "device": None}

    def write() -> None:
        tmp = folder / "environment.json.tmp"
        tmp.write_text(json.dumps(record, indent=2, default=str))
        tmp.replace(folder / "environment.json")

    write()
    try:
        facts = device_facts(device)
    except Exception as error:
        record["device"] = {"error": f"{type(error).__name__}: {error}"}
        write()
        return fail(f"measuring the device failed: {type(error).__name__}: {error}")
    for key, value in facts.items():
        print(f"{key}: {value}")
    record["device"] = facts
    write()
    record["nvidia_smi"] = nvidia_smi()
    print(record["nvidia_smi"].splitlines()[0] if record["nvidia_smi"].strip() else "nvidia-smi: no output")
    write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
