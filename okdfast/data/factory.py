"""One factory and one flag for every loader: ``--loader {auto,gpu,dali,ffcv,torch}``.

    train_loader, test_loader = build_data_loaders(splits, loader="auto", device=device, batch_size=128,
                                                   channels_last=True, distributed=(rank, world_size))
    for epoch in range(start, epochs):
        train_loader.set_epoch(epoch)
        for images, labels in train_loader:  # on `device`, normalised, augmented, in the model's layout and dtype
            ...

Every loader yields the same thing (``okdfast.data.base``) and follows the same
:class:`~okdfast.data.plan.EpochPlan`: a fresh permutation per epoch, a pure function of ``(seed, epoch)``;
the exact epoch length (``drop_last`` as asked for training, never for evaluation); ``DistributedSampler``'s
sharding under torchrun.

- ``gpu`` (:mod:`okdfast.data.gpu_loader`): the uint8 data set resident on the device, one fused Triton launch per
  batch. The fastest where the data fits (airbench's approach).
- ``dali`` (:mod:`okdfast.data.dali_loader`): an NVIDIA DALI pipeline (GPU operators on CUDA, CPU-only otherwise).
- ``ffcv`` (:mod:`okdfast.data.ffcv_loader`): an FFCV ``.beton`` per data set and split, FFCV's Loader.
- ``torch`` (:mod:`okdfast.data.torch_loader`): the reference, a DataLoader with worker processes.
- ``auto``: on CUDA, ``gpu`` when the data set fits (:func:`~okdfast.data.gpu_loader.fits_on_device`), else ``dali``
  when installed, else ``torch``; on the CPU, :data:`CPU_AUTO`. The choice and its reason are printed.

:data:`CPU_AUTO` is ``torch``: on the CPU a training step costs about a thousand times a batch's preparation, so
what decides is whether the preparation overlaps the step. In the in-process loaders (gpu-on-CPU, dali, ffcv) it
runs between steps; in the torch loader's worker processes it runs beside them. Alone, the in-process loaders are
faster; in training the torch loader won on the 2-core development machine, at the same accuracy for all four (the
same batches): ``benchmarks/results/loader.csv``, ``loader_train.csv`` and ``train.csv``. On CUDA the preparation
is a kernel launch and the gpu loader is the choice.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from okdfast.data.arrays import ArrayDataset
from okdfast.data.base import Delivery, PlannedLoader
from okdfast.data.loader import EpochLoader
from okdfast.data.plan import EpochPlan, build_plans
from okdfast.data.registry import DatasetSplits

LOADERS = ("auto", "gpu", "dali", "ffcv", "torch")
CPU_AUTO = "torch"


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def install_hint(name: str) -> str | None:
    """What to install (one line) when the optional package of loader ``name`` is missing, else None."""
    if name == "dali" and not _present("nvidia.dali"):
        from okdfast.data.dali_loader import INSTALL_HINT

        return INSTALL_HINT
    if name == "ffcv" and not (_present("ffcv") and _present("numba")):
        from okdfast.data.ffcv_loader import INSTALL_HINT

        return INSTALL_HINT
    return None


def resolve_loader(name: str, splits: DatasetSplits, device: torch.device) -> tuple[str, str]:
    """(loader, why): ``auto`` resolved for this data set and device; other names checked and returned as they are."""
    if name not in LOADERS:
        raise ValueError(f"--loader {name}: choose one of {', '.join(LOADERS)}")
    if name != "auto":
        hint = install_hint(name)
        if hint is not None:
            raise ImportError(f"--loader {name} {hint}")
        return name, "asked for"
    from okdfast.data.gpu_loader import device_bytes, fits_on_device

    mib = device_bytes(splits) / 2**20
    if device.type == "cuda":
        if fits_on_device(splits, device):
            return "gpu", f"the data set ({mib:.0f} MiB as uint8) fits on {device}"
        if install_hint("dali") is None:
            return "dali", f"the data set ({mib:.0f} MiB) is too big for {device}'s memory; DALI is installed"
        return "torch", f"the data set ({mib:.0f} MiB) is too big for {device}'s memory and DALI is not installed"
    return CPU_AUTO, f"on {device.type}: worker processes prepare batches beside the step (measured fastest there)"


def build_data_loaders(
    splits: DatasetSplits,
    *,
    loader: str = "auto",
    device: torch.device | str = "cpu",
    batch_size: int,
    eval_batch_size: int | None = None,
    num_workers: int = 2,
    seed: int = 0,
    augment: bool = True,
    drop_last: bool = False,
    distributed: tuple[int, int] | None = None,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    dali_files: bool | None = None,
    ffcv_native_augment: bool = False,
    verbose: bool = True,
    min_last_batch: int = 1,
) -> tuple[PlannedLoader, PlannedLoader]:
    """(train loader: shuffled, augmented; test loader: in order, normalised only), both delivering on ``device``.

    loader: ``auto`` | ``gpu`` | ``dali`` | ``ffcv`` | ``torch`` (module docstring). num_workers: the torch loader's
    worker processes, DALI's CPU threads, FFCV's numba threads (the gpu loader needs none). distributed:
    ``(rank, world_size)``. channels_last, dtype: what the model takes. data_dir / cache_dir: where the ffcv
    ``.beton`` files go (cache_dir wins; default next to the data). dali_files: decode the image files with DALI
    (default: when ``splits.files`` lists them, i.e. CINIC-10 read from its folders). ffcv_native_augment: FFCV's
    own unseeded flip/translate (not reproducible). verbose: print the choice of ``auto`` and cache writes.
    min_last_batch: a last training batch smaller than this is dropped (:func:`~okdfast.data.plan.build_plans`).
    """
    device = _delivery_device(device)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype}: use torch.float32, torch.bfloat16 or torch.float16")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers={num_workers!r}: must be an int >= 0")
    name, why = resolve_loader(loader, splits, device)
    if verbose and loader == "auto":
        print(f"okdfast: --loader auto -> {name} ({why})", flush=True)
    train_plan, test_plan = build_plans(
        splits,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        seed=seed,
        augment=augment,
        drop_last=drop_last,
        distributed=distributed,
        min_last_batch=min_last_batch,
    )
    parts = _Parts(splits, (train_plan, test_plan), Delivery(device, channels_last, dtype), num_workers)
    if name == "torch":
        return _torch_loaders(parts)
    if name == "gpu":
        return _gpu_loaders(parts)
    if name == "dali":
        return _dali_loaders(parts, dali_files)
    if name == "ffcv":
        return _ffcv_loaders(parts, cache_dir, data_dir, ffcv_native_augment)
    raise AssertionError(name)


def _delivery_device(device: torch.device | str) -> torch.device:
    """``device`` as a torch.device, a bare ``cuda`` made the current CUDA device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class _Parts(NamedTuple):
    """What every loader back-end is built from: the data, the two epoch plans, the delivery, the workers."""

    splits: DatasetSplits
    plans: tuple[EpochPlan, EpochPlan]
    delivery: Delivery
    num_workers: int

    def pairs(self) -> tuple[tuple[ArrayDataset, EpochPlan, str], ...]:
        """(data set, plan, split name) of the train and the test split."""
        return ((self.splits.train, self.plans[0], "train"), (self.splits.test, self.plans[1], "test"))


def _torch_loaders(parts: _Parts) -> tuple[PlannedLoader, PlannedLoader]:
    from okdfast.data.torch_loader import TorchLoader

    splits, delivery = parts.splits, parts.delivery
    options: dict[str, Any] = {"num_workers": parts.num_workers, "pin_memory": delivery.device.type == "cuda"}
    mean, std = splits.mean, splits.std
    train, test = (TorchLoader(EpochLoader(ds, plan, mean, std, **options), delivery) for ds, plan, _ in parts.pairs())
    return train, test


def _gpu_loaders(parts: _Parts) -> tuple[PlannedLoader, PlannedLoader]:
    from okdfast.data.gpu_loader import GpuLoader

    splits = parts.splits
    train, test = (GpuLoader(ds, plan, splits.mean, splits.std, parts.delivery) for ds, plan, _ in parts.pairs())
    return train, test


def _dali_loaders(parts: _Parts, dali_files: bool | None) -> tuple[PlannedLoader, PlannedLoader]:
    from okdfast.data.dali_loader import DaliLoader

    splits = parts.splits
    use_files = splits.files is not None if dali_files is None else dali_files
    if use_files and splits.files is None:
        raise ValueError(f"dali_files=True: {splits.name} was not read from image files ({splits.source})")
    threads = max(1, parts.num_workers)
    mean, std = splits.mean, splits.std
    train, test = (
        DaliLoader(ds, plan, mean, std, parts.delivery, num_threads=threads, files=_files(splits, split, use_files))
        for ds, plan, split in parts.pairs()
    )
    return train, test


def _ffcv_loaders(parts: _Parts, cache_dir, data_dir, native_augment: bool) -> tuple[PlannedLoader, PlannedLoader]:
    from okdfast.data.ffcv_loader import FfcvLoader, default_cache_dir, ensure_beton

    splits = parts.splits
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(data_dir)
    loaders = []
    for ds, plan, split in parts.pairs():
        beton = ensure_beton(ds, splits.name, split, folder)
        loaders.append(
            FfcvLoader(
                beton,
                len(ds),
                plan,
                splits.mean,
                splits.std,
                parts.delivery,
                num_workers=max(1, parts.num_workers),
                native_augment=native_augment and split == "train",
            )
        )
    return loaders[0], loaders[1]


def _files(splits: DatasetSplits, split: str, use: bool) -> Iterable[Path] | None:
    return splits.files[split] if use and splits.files is not None else None
