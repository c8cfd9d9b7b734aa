"""Checkpoints: written atomically, read back only as tensors and plain containers, refused with a clear message.

Writing: ``torch.save`` into memory, then :func:`okdfast.utils.atomic_files.atomic_write_bytes` (same-folder
temporary file -> fsync -> rename -> fsync of the folder): a crash never leaves a half-written file where a good one
stood, and a full disk is reported as the OS's ``No space left on device`` on the file it hit (not as an enforce
failure deep inside torch's zip writer).

Reading: :func:`load_checkpoint` checks what the file is before unpickling anything, with
``torch.load(weights_only=True)``: checkpoints hold only tensors and plain Python containers/numbers/strings, so a
file that needs anything else is refused, never loaded with the unsafe unpickler. Every refusal names the file,
what it is (missing, a folder, empty, truncated, not a PyTorch file, not okdfast's, another format) and what was
expected.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from okdfast.errors import CheckpointError
from okdfast.utils.atomic_files import atomic_write_bytes

CHECKPOINT_FORMATS = (1, 2)  # 2 adds the metrics history, the data fingerprint and the run config's speed settings
EXPECTED = "a last.pt or best.pt written by okdfast.train"


def serialize(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save ``obj`` to ``path`` atomically (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, serialize(obj))


def _describe_start(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "other"


def _read(path: Path, prefix: str, map_location: str | torch.device) -> Any:
    """torch.load(weights_only=True) after checking what the file is; every failure as a CheckpointError."""
    if path.is_dir():
        inside = [name for name in ("last.pt", "best.pt") if (path / name).is_file()]
        hint = f"; it holds {' and '.join(inside)}: pass {path / inside[0]}" if inside else ""
        raise CheckpointError(f"{prefix} is a folder, not a checkpoint file{hint} (expected {EXPECTED})")
    if not path.is_file():
        raise CheckpointError(f"{prefix} does not exist (expected {EXPECTED})")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{prefix} is empty (0 bytes), not a checkpoint (expected {EXPECTED})")
    kind = _describe_start(path)
    if kind == "zip" and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{prefix} is truncated ({size} bytes: a zip archive without its end, e.g. a copy cut short); "
            f"expected {EXPECTED}, which okdfast writes atomically: use the run folder's own last.pt or best.pt"
        )
    if kind != "zip":
        what = "a plain pickle (not a torch.save zip archive)" if kind == "pickle" else "not a PyTorch file"
        raise CheckpointError(f"{prefix} is {what} ({size} bytes); expected {EXPECTED}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(
            r"Unsupported global: GLOBAL ([\w.]+)|Unsupported operand \d+|[Uu]nsupported class [\w.]+", str(error)
        )
        what = f" ({found.group(0)})" if found else ""
        raise CheckpointError(
            f"{prefix} holds Python objects other than tensors and plain containers{what}, which okdfast "
            f"checkpoints never do; it is refused because loading it could run code; expected {EXPECTED}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as error:
        raise CheckpointError(f"{prefix} is damaged ({_first_line(error)}); expected {EXPECTED}") from None


def load_checkpoint(path: str | os.PathLike, *, where: str, map_location: str | torch.device = "cpu") -> dict:
    """The payload of an okdfast checkpoint, or a :class:`CheckpointError` saying what the file is instead.

    ``where`` names the argument that gave the path in messages (``--resume``, ``okdfast.evaluate``).
    """
    path = Path(path)
    prefix = f"{where} {path}"
    payload = _read(path, prefix, map_location)
    if not isinstance(payload, dict) or "format" not in payload or "model" not in payload:
        if isinstance(payload, dict):
            held = f"a dict with keys {sorted(map(str, payload))[:8]}"
        else:
            held = f"a {type(payload).__name__}"
        raise CheckpointError(
            f"{prefix} is a PyTorch file but not an okdfast checkpoint (it holds {held}); expected {EXPECTED}"
        )
    if payload.get("format") not in CHECKPOINT_FORMATS:
        raise CheckpointError(
            f"{prefix} has checkpoint format {payload.get('format')!r}; this okdfast reads formats "
            f"{', '.join(map(str, CHECKPOINT_FORMATS))} (written by another okdfast version?)"
        )
    for key, kind in (("config", dict), ("state", dict), ("model", dict)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"{prefix} is an okdfast checkpoint without its {key!r}; expected {EXPECTED}")
    return payload


def _first_line(error: BaseException) -> str:
    """The first line of an error, without torch's advice to load with the unsafe unpickler."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(" (Re-running")[0].split(". Re-running")[0][:300]


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """The names of the floating-point tensors of a state dict that hold NaN or inf."""
    return [
        name
        for name, value in state.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load any file written by :func:`atomic_save` without unpickling arbitrary objects (for okdfast's own
    checkpoints, :func:`load_checkpoint` also checks what they hold)."""
    path = Path(path)
    return _read(path, f"checkpoint {path}", map_location)
