"""The prerequisite of every suite stage: the stack imports and sees the device; then the device's facts and ceilings.

    python -m benchmarks.gpu_checks.environment --require-cuda

Prints one line per fact and, on a failure, one line naming what broke (exit 1). Writes ``environment.json``
(versions, the okdfast run manifest), ``device.json`` and a ``device.csv`` row to the results folder: name, SMs,
memory, L2, the measured copy bandwidth (a 1 GiB device-to-device copy, bytes read + written) and bf16 matmul rate
(8192^3) that the benchmarks report their GB/s and FLOP/s against, and ``nvidia-smi``'s view of the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path


def fail(message: str) -> int:
    print(f"environment: {message}", flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-cuda", action="store_true", help="fail unless a CUDA device is visible")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        import torch
    except Exception as error:  # the one line the suite reports
        return fail(f"import torch failed: {type(error).__name__}: {error}")
    try:
        import triton
    except Exception as error:
        return fail(f"import triton failed: {type(error).__name__}: {error}")
    try:
        import okdfast.kernels.augment
        import okdfast.kernels.online_kd

        import okdfast
        import okdfast.ops  # noqa: F401  (registers the torch.library ops)
    except Exception as error:
        return fail(f"import okdfast failed ({type(error).__name__}: {error}); was `pip install -e .` run?")
    print(f"python {sys.version.split()[0]} ({sys.executable})")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
    print(f"okdfast from {Path(okdfast.__file__).parent}")
    if args.require_cuda and not torch.cuda.is_available():
        return fail(f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)")

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.harness import append_row, device_facts, machine_columns, results_dir
    from okdfast.utils.environment import environment_manifest

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = results_dir(args.results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "environment.json").write_text(json.dumps(environment_manifest(device), indent=2, default=str))
    try:
        facts = device_facts(device)
    except Exception as error:
        return fail(f"measuring the device failed: {type(error).__name__}: {error}")
    for key, value in facts.items():
        print(f"{key}: {value}")
    (folder / "device.json").write_text(json.dumps(facts, indent=2, default=str))
    append_row("device", machine_columns("device", device) | facts, folder)
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=20)
        (folder / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
