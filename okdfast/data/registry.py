"""Data sets registered by name (timm style): ``@register_dataset("cifar10")``, ``load_dataset``, ``list_datasets``.

A registered builder is ``fn(roots, *, download, seed, **options) -> DatasetSplits``: ``roots`` are the folders
to search in order (``okdfast.data.locate.search_roots``), ``options`` the data-set specific keyword arguments
that :func:`load_dataset` passes through (e.g. ``include_valid`` for ``cinic10``, ``num_classes`` for
``synthetic``). Built in: ``cifar10``, ``cifar100``, ``cinic10``, ``synthetic``, ``synthetic100``, registered when
``okdfast.data`` is imported (which Python does before any of its modules).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from okdfast.data.arrays import ArrayDataset
from okdfast.data.locate import DatasetNotFoundError, dedupe, download_root, search_roots
from okdfast.data.provenance import DataProvenance
from okdfast.data.stats import RGB
from okdfast.errors import ConfigError, DataError
from okdfast.utils.registry import Registry


@dataclass
class DatasetSplits:
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    mean: RGB  # per-channel normalisation on the [0, 1] scale
    std: RGB
    name: str  # the registered name, e.g. "cifar100"
    source: str  # human-readable origin: a path, or "synthetic(seed=...)"
    # The image file of every row, per split ("train", "test"), when the data set was read from an image folder
    # (CINIC-10): lets a loader decode the files itself (--loader dali). None for arrays and subsets.
    files: dict[str, list[Path]] | None = None
    # The file read, its sha256 and whether it is partial or lossy (okdfast.data.provenance); None for generated data.
    provenance: DataProvenance | None = None

    def subset(self, n: int, seed: int = 0) -> DatasetSplits:
        """``n`` training and ``max(1, n // 5)`` test images (capped at the test set), class-stratified, seeded.

        mean/std stay the data set's own constants: a subset is a sample of the same distribution.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"--subset {n!r}: must be a positive int (number of training images)")
        if n > len(self.train):
            raise ConfigError(
                f"--subset {n}: exceeds the {len(self.train)} training images of {self.name}; use at most "
                f"{len(self.train)}, or drop --subset to train on all of them"
            )
        n_test = min(max(1, n // 5), len(self.test))
        return dataclasses.replace(
            self,
            train=self.train.subset(n, seed),
            test=self.test.subset(n_test, seed + 1),
            source=f"{self.source} [subset train={n} test={n_test} seed={seed}]",
            files=None,
        )


DatasetBuilder = Callable[..., DatasetSplits]

DATASETS: Registry[DatasetBuilder] = Registry("dataset")


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Decorator: register ``fn(roots, *, download, seed, **options) -> DatasetSplits`` under ``name``."""
    return DATASETS.decorator(name)


def list_datasets(pattern: str = "*") -> list[str]:
    """Sorted registered names matching the fnmatch ``pattern`` (e.g. ``"cifar*"``)."""
    return DATASETS.names(pattern)


def _canonical(name: str) -> str:
    # "CIFAR-10", "cifar_10" and "cifar10" all name the same data set.
    return name.lower().replace("-", "").replace("_", "")


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    subset: int | None = None,
    seed: int = 0,
    **options: Any,
) -> DatasetSplits:
    """Load the data set ``name`` into memory.

    data_dir: where to look (default: ``$OKDFAST_DATA``, else ``./data`` then ``~/.cache/okdfast/data``).
    download: fetch a data set that is in none of them into ``data_dir``, else the first folder of ``$OKDFAST_DATA``,
        else ``~/.cache/okdfast/data`` (``okdfast.data.locate.download_root``); network steps time out after 10 s.
    subset: keep a seeded, class-stratified ``subset`` training images and ``subset // 5`` test images.
    seed: seeds the subset draw and the synthetic generator.
    options: passed to the builder (``include_valid=True`` for ``cinic10``; ``num_classes``, ``train_size``,
        ``test_size`` for ``synthetic``).
    Raises :class:`~okdfast.data.locate.DatasetNotFoundError` when the files are in none of the searched places.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be a non-negative int")
    key = _canonical(name)
    builders = {_canonical(k): k for k in DATASETS}
    if key not in builders:
        raise DATASETS.unknown(name)
    roots: list[Path] = search_roots(data_dir)

    def build(where: list[Path], fetch: bool) -> DatasetSplits:
        return DATASETS[builders[key]](where, download=fetch, seed=seed, **options)

    try:
        try:
            splits = build(roots, False)
        except DatasetNotFoundError:
            if not download:
                raise
            target, searched = download_root(roots), ", ".join(str(root.absolute()) for root in roots)
            print(
                f"okdfast: data set {builders[key]!r} is in none of {searched}: downloading it into {target} (progress "
                "below; the archive and the files checked against their checksums)",
                flush=True,
            )
            splits = build(dedupe([target, *roots]), True)  # the target first: the builders fetch into roots[0]
    except DatasetNotFoundError:
        raise
    except (ValueError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        # The readers raise these for files that exist but are not the data set's: damaged, another layout,
        # another data set (their messages name the file and what was expected).
        where = ", ".join(str(root) for root in roots)
        reason = str(error).rstrip(".") or type(error).__name__
        raise DataError(
            f"data set {builders[key]!r} in {where}: its files could not be read ({reason}). Fix: replace the "
            "damaged files (fetch them again with --download into an empty folder) or point --data-dir at a good copy"
        ) from error
    if subset is not None:
        splits = splits.subset(subset, seed)
    return splits
