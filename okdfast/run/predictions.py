"""Per-image test predictions of a run: ``predictions.npz`` in its run folder, replaced atomically after every
evaluation, so that ``okdfast.reproduce`` can compare two methods image by image (paired statistics).

Keys (``np.load(path, allow_pickle=False)``): ``epoch`` (the epoch evaluated), ``labels`` (N,), ``branches`` (K, N)
the argmax of each branch, ``ensemble`` (N,) the argmax of the mean branch softmax, ``head_<name>`` (N,) the
argmax of each method head (leader, aux_ensemble, target, gate), ``image_index`` (N,) each row's position in the
test split. Class ids are uint8 (int16 for more than 256 classes): about (K + 4) bytes per test image.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from torch import Tensor

from okdfast.run.scoring import prediction_arrays
from okdfast.utils.atomic_files import atomic_write_bytes

PREDICTIONS_FILE = "predictions.npz"


def write_predictions(run_dir: str | Path, epoch: int, batches: list[dict[str, Tensor]]) -> Path:
    """Write the predictions :func:`okdfast.run.scoring.evaluate` collected (``predictions=``) for ``epoch``."""
    arrays = prediction_arrays(batches)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, epoch=np.int64(epoch), **arrays)
    return atomic_write_bytes(Path(run_dir) / PREDICTIONS_FILE, buffer.getvalue())


def read_predictions(run_dir: str | Path) -> dict[str, np.ndarray] | None:
    """The arrays of a run's predictions.npz, or None when the run has none."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
