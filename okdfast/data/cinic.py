"""CINIC-10 reader: the ImageFolder layout of the official archive, decoded once and cached as ``.npz``.

Accepted inside a data folder ``<dir>`` (first match wins): ``<dir>/cinic10/``, ``<dir>/CINIC-10/``,
``<dir>/cinic-10/`` or ``<dir>`` itself, each holding ``train/ valid/ test/`` with one folder per class of 32x32
PNGs (``valid/`` is optional); or ``<dir>/cinic10.npz`` (``<dir>/cinic10/cinic10.npz``) with the keys of
``okdfast.data.cifar.read_npz`` (plus optional ``x_valid``/``y_valid``).

Labels are the sorted class-folder names (ImageFolder's rule), which for CINIC-10 is CIFAR-10's order. The 270k
PNGs take a while to decode, so the arrays are cached next to the data as ``okdfast-cinic10-cache.npz`` (or, when
that folder is read-only, under ``~/.cache/okdfast/``); the cache records a fingerprint of every file's path, size
and mtime and is rebuilt when any of them changes.

Training uses ``train`` (``include_valid=True``: train + valid, the CINIC authors' larger training set); the test
set is ``test``. When read from the folders, ``DatasetSplits.files`` lists the PNG of every row (so ``--loader
dali`` can decode the files itself; the arrays are the same images). CINIC-10 has no torchvision downloader:
``download=True`` fetches the official archive (:data:`CINIC10_URL`, ~690 MB) with urllib and extracts it to
``<dir>/cinic10/``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from okdfast.data.arrays import ArrayDataset
from okdfast.data.cifar import read_npz
from okdfast.data.locate import NETWORK_TIMEOUT_S, check_host_reachable, dedupe, not_found
from okdfast.data.registry import DatasetSplits, register_dataset
from okdfast.data.stats import dataset_stats
from okdfast.utils.atomic_files import atomic_output

CINIC10_URL = "https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz"
CACHE_NAME = "okdfast-cinic10-cache.npz"
CACHE_VERSION = 1
SPLITS = ("train", "valid", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
LAYOUT = "<dir>/cinic10/{train,valid,test}/<class>/*.png (10 class folders of 32x32 PNGs per split)"


# ---------------------------------------------------------------------------------------------------------------
# folder listing and fingerprint
# ---------------------------------------------------------------------------------------------------------------
def _subdirs(path: Path) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir())


def is_image_folder(path: Path) -> bool:
    """``path`` holds ``train/`` and ``test/`` with at least one class folder each."""
    return all((path / split).is_dir() and _subdirs(path / split) for split in ("train", "test"))


def list_image_folder(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]], str]:
    """(classes, {split: [(file, label), ...]}, fingerprint) of the ImageFolder tree under ``root``.

    The fingerprint hashes every file's relative path, size and mtime: it changes when any file is added,
    removed, renamed or rewritten.
    """
    digest = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    classes: list[str] | None = None
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            if split == "valid":
                continue
            raise FileNotFoundError(f"{split_dir}: missing (expected {LAYOUT})")
        split_classes = _subdirs(split_dir)
        if classes is None:
            classes = split_classes
        elif split_classes != classes:
            raise ValueError(f"{split_dir}: class folders {split_classes} differ from train's {classes}")
        entries = []
        for label, cls in enumerate(split_classes):
            with os.scandir(split_dir / cls) as it:
                found = sorted(
                    (e for e in it if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES),
                    key=lambda e: e.name,
                )
            for e in found:
                st = e.stat()
                digest.update(f"{split}/{cls}/{e.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
                entries.append((Path(e.path), label))
        files[split] = entries
    return classes or [], files, digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# decoding and the cache
# ---------------------------------------------------------------------------------------------------------------
def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))  # a few CINIC images (from ImageNet) are greyscale
    if arr.shape != (32, 32, 3):
        raise ValueError(f"{path}: expected a 32x32 image, got {arr.shape[1]}x{arr.shape[0]}")
    return arr


def _decode_split(entries: list[tuple[Path, int]]) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(entries), 32, 32, 3), dtype=np.uint8)
    # PIL releases the GIL while decoding, so threads help.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for i, arr in enumerate(pool.map(_decode, [p for p, _ in entries], chunksize=256)):
            images[i] = arr
    labels = np.fromiter((label for _, label in entries), dtype=np.int64, count=len(entries))
    return images, labels


def cache_paths(root: Path) -> list[Path]:
    """Where the cache of ``root`` is read and written: next to the data, else the user cache folder."""
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    return [root / CACHE_NAME, Path("~/.cache/okdfast").expanduser() / f"cinic10-{key}.npz"]


def _read_cache(path: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            return {k: z[k] for k in z.files if k != "fingerprint"}
    except (OSError, KeyError, ValueError):
        return None


def _write_cache(paths: list[Path], arrays: dict[str, np.ndarray], fingerprint: str) -> Path | None:
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path) as tmp, open(tmp, "wb") as f:  # a reader never sees a half-written cache
                np.savez(f, fingerprint=np.array(fingerprint), **arrays)
            return path
        except OSError:  # this place is not writable: the next one
            pass
    warnings.warn(f"could not write the CINIC-10 cache to any of {[str(p) for p in paths]}", stacklevel=3)
    return None


def read_cinic_folder_with_files(
    root: str | Path, *, use_cache: bool = True
) -> tuple[dict[str, ArrayDataset], str, dict[str, list[Path]]]:
    """({split: ArrayDataset} for train, test and valid if present, where they came from, {split: [image file of
    each row]}) (the rows are decoded in this order)."""
    root = Path(root)
    classes, files, fingerprint = list_image_folder(root)
    paths = {split: [p for p, _ in entries] for split, entries in files.items()}
    num_classes = len(classes)
    if use_cache:
        for path in cache_paths(root):
            arrays = _read_cache(path, fingerprint) if path.is_file() else None
            if arrays is not None:
                return _to_datasets(arrays, num_classes), f"{root.absolute()} (cache {path})", paths
    n = sum(len(v) for v in files.values())
    print(f"okdfast: decoding {n} images under {root} once (cached as .npz for the next runs)", flush=True)
    arrays = {}
    for split, entries in files.items():
        arrays[f"x_{split}"], arrays[f"y_{split}"] = _decode_split(entries)
    written = _write_cache(cache_paths(root), arrays, fingerprint) if use_cache else None
    where = f"cache written to {written}" if written else "not cached"
    return _to_datasets(arrays, num_classes), f"{root.absolute()} (decoded; {where})", paths


def _to_datasets(arrays: dict[str, np.ndarray], num_classes: int) -> dict[str, ArrayDataset]:
    return {
        split: ArrayDataset(arrays[f"x_{split}"], arrays[f"y_{split}"], num_classes)
        for split in SPLITS
        if f"x_{split}" in arrays
    }


# ---------------------------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------------------------
def download_cinic10(root: Path) -> Path:
    """Fetch the official archive into ``root`` and extract it to ``root/cinic10``; returns that folder."""
    dest = (root / "cinic10").absolute()
    print(f"okdfast: downloading CINIC-10 (~690 MB) from {CINIC10_URL}\n  extracting to {dest} ({LAYOUT})", flush=True)
    check_host_reachable(CINIC10_URL)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "CINIC-10.tar.gz"
    if not archive.is_file():
        request = urllib.request.Request(CINIC10_URL, headers={"User-Agent": "okdfast"})
        # The timeout bounds every connect and read: a stalled transfer fails instead of hanging.
        with (
            atomic_output(archive) as part,
            urllib.request.urlopen(request, timeout=NETWORK_TIMEOUT_S) as response,
            open(part, "wb") as f,
        ):
            shutil.copyfileobj(response, f, length=1 << 20)
    # Extract beside the destination, then move the folder that holds the splits into place: a half-extracted
    # archive is never mistaken for the data set, and a wrapping top-level folder disappears.
    staging = root / "cinic10.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(staging, filter="data")
        else:  # Python without PEP 706 filters: the archive is the official one, fetched over https
            tar.extractall(staging)
    found = staging if is_image_folder(staging) else None
    if found is None:
        inner = [p for p in staging.iterdir() if p.is_dir() and is_image_folder(p)]
        found = inner[0] if len(inner) == 1 else None
    if found is None:
        raise FileNotFoundError(f"{archive} extracted to {staging}, but not in the layout {LAYOUT}")
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not a CINIC-10 folder; move it away and retry")
    if dest.exists():
        dest.rmdir()
    os.replace(found, dest)
    shutil.rmtree(staging, ignore_errors=True)
    archive.unlink()
    return dest


# ---------------------------------------------------------------------------------------------------------------
# builder
# ---------------------------------------------------------------------------------------------------------------
def find_cinic10(roots: list[Path]) -> tuple[Path | None, list[Path]]:
    """The first CINIC-10 folder or ``.npz`` under ``roots``, and every path tried."""
    tried = dedupe(
        [
            c
            for root in roots
            for c in (
                root / "cinic10",
                root / "CINIC-10",
                root / "cinic-10",
                root / "cinic10.npz",
                root / "cinic10" / "cinic10.npz",
                root,
            )
        ]
    )
    for path in tried:
        if (path.is_file() and path.suffix == ".npz") or (path.is_dir() and is_image_folder(path)):
            return path, tried
    return None, tried


@register_dataset("cinic10")
def build_cinic10(
    roots: list[Path], *, download: bool = False, seed: int = 0, include_valid: bool = False
) -> DatasetSplits:
    """CINIC-10; ``include_valid``: train on train + valid (180k images) instead of train (90k)."""
    layouts = [
        f"{LAYOUT}, from {CINIC10_URL}",
        "<dir>/CINIC-10/... or <dir>/cinic-10/... (same layout)",
        "<dir>/cinic10.npz (x_train, y_train, x_test, y_test; optional x_valid, y_valid)",
    ]
    path, tried = find_cinic10(roots)
    if path is None and download:
        try:
            path = download_cinic10(roots[0])
        except Exception as e:  # network, disk or archive failure: report it with the paths tried
            raise not_found("cinic10", tried, layouts, roots, reason=f"{type(e).__name__}: {e}") from e
    if path is None:
        raise not_found("cinic10", tried, layouts, roots)
    stats = dataset_stats("cinic10")
    files: dict[str, list[Path]] | None = None
    if path.is_file():
        splits, source = read_npz(path, stats.num_classes), f"{path.absolute()} (npz)"
    else:
        splits, source, files = read_cinic_folder_with_files(path)
    if any(d.num_classes != stats.num_classes for d in splits.values()):
        raise ValueError(f"{path}: expected {stats.num_classes} classes, found {splits['train'].num_classes}")
    train = splits["train"]
    if include_valid:
        if "valid" not in splits:
            raise ValueError(f"{path}: include_valid=True but there is no valid split")
        valid = splits["valid"]
        train = ArrayDataset(
            np.concatenate([train.images, valid.images]), np.concatenate([train.labels, valid.labels]), 10
        )
        source += " train+valid"
        if files is not None:
            files = {"train": files["train"] + files["valid"], "test": files["test"]}
    if files is not None:
        files = {"train": files["train"], "test": files["test"]}
    test = splits["test"]
    return DatasetSplits(train, test, stats.num_classes, stats.mean, stats.std, "cinic10", source, files)
