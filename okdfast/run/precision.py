"""Which autocast dtype a run uses (``--amp``), and the warning a CPU without native bf16 deserves.

On CUDA, ``auto`` is bf16 where the device supports it, else fp16 (with a GradScaler). On the CPU, autocast runs
bf16; on a CPU without native bf16 instructions (``avx512_bf16`` / ``amx_bf16``) every bf16 op is emulated and a
step is several times slower than fp32 (reported on an AVX2 machine). So ``--amp auto``
there runs fp32 and says so; an explicit ``--amp bf16`` is kept, with a warning and the ``--amp off`` alternative.
"""

from __future__ import annotations

from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU has native bf16 arithmetic (Linux: from /proc/cpuinfo's flags; None where unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = {word for line in text.splitlines() if line.startswith(("flags", "Features")) for word in line.split()}
    if not flags:
        return None
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """'auto': bf16 where the device supports it natively, else fp16 on CUDA and fp32 (None) on the CPU."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None if cpu_has_native_bf16() is False else torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def amp_notes(amp: str, device: torch.device) -> list[str]:
    """Log lines about the precision this run will use on ``device`` (none when there is nothing to say)."""
    if device.type != "cpu" or cpu_has_native_bf16() is not False:
        return []
    flags = "/".join(NATIVE_BF16_FLAGS)
    if amp == "auto":
        return [f"--amp auto: this CPU has no native bf16 ({flags}), where bf16 autocast runs several times slower "
                "than fp32; training in fp32 (--amp bf16 forces bf16)"]  # fmt: skip
    if amp == "bf16":
        return [f"warning: --amp bf16 on a CPU without native bf16 ({flags}) runs several times slower than fp32; "
                "--amp off is faster here"]  # fmt: skip
    return []
