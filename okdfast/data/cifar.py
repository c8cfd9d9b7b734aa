"""CIFAR-10 / CIFAR-100 readers: the official python-pickle folders and ``.npz`` arrays.

Accepted inside a data folder ``<dir>`` (first match wins; ``<dir>`` itself may also be one of the folders, or an
``.npz`` file, when passed explicitly as ``data_dir``):

- ``<dir>/cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (the "python
  version" from https://www.cs.toronto.edu/~kriz/cifar.html, what ``torchvision.datasets.CIFAR10`` downloads);
  each file is a pickled dict with ``b'data'`` uint8 (N, 3072) -- the R, G, B planes of 32x32, row-major -- and
  ``b'labels'``;
- ``<dir>/cifar-100-python/`` with ``train`` and ``test`` (labels from ``b'fine_labels'``, 100 classes);
- ``<dir>/cifar10.npz`` / ``<dir>/cifar100.npz``, or either form inside ``<dir>/cifar10/`` / ``<dir>/cifar100/``.

``data_dir`` may also name an ``.npz`` file of any name (e.g. a partial set such as ``cifar10-exact-subset.npz``);
keys that are not image or label arrays are ignored. What was read is recorded with its sha256 and whether it is
partial or lossy (:mod:`okdfast.data.provenance`), so a result is never taken for one on the official data.

The ``.npz`` layout: ``x_train`` uint8 (N, 32, 32, 3), ``y_train`` int (N,), ``x_test``, ``y_test``. Also accepted:
key names ``train_x``/``train_y``/``test_x``/``test_y`` or ``train_images``/``train_labels``/... in any letter
case; images as NCHW (N, 3, 32, 32) or CIFAR's flat planar (N, 3072); any integer image dtype with values in
0..255; labels of shape (N, 1). Float images are refused (their scale is ambiguous). Optional ``x_valid``/
``y_valid`` (or ``x_val``, ``valid_x``, ...) are read where a data set has a validation split (CINIC-10). And
JPEG bytes: ``jpeg_train`` uint8 with ``offsets_train`` (N+1,) (image i is ``jpeg_train[offsets[i]:offsets[i+1]]``),
the same for ``test``, as in ``cifar10-jpeg.npz``: decoded with Pillow on load and marked lossy.

The pickle files are read by an unpickler that admits only what the official files contain (dicts, lists, bytes,
strings, ints and numpy arrays: numpy's array reconstructors, ``ndarray`` and ``dtype``), so a crafted file that
asks for anything else (``os.system``, any class or function) is refused with one line and runs nothing. The other
inputs are checked before they are used: an ``.npz`` that is a renamed ``.npy``, splits with too few images, JPEG
offsets that are not integers, and JPEG files whose header is not 32x32 (a decompression bomb is never decoded).
"""

from __future__ import annotations

import codecs
import io
import pickle
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from okdfast.data.arrays import ArrayDataset
from okdfast.data.locate import check_host_reachable, dedupe, network_timeout, not_found
from okdfast.data.provenance import describe
from okdfast.data.registry import DatasetSplits, register_dataset
from okdfast.data.stats import dataset_stats

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

# name -> (pickle folder, files that mark it, npz file name, subfolder)
_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", ("data_batch_1", "test_batch"), "cifar10.npz", "cifar10"),
    "cifar100": ("cifar-100-python", ("train", "test"), "cifar100.npz", "cifar100"),
}


# ---------------------------------------------------------------------------------------------------------------
# python-pickle folders
# ---------------------------------------------------------------------------------------------------------------
def _numpy_function(module: str, name: str) -> Any:
    core = getattr(np, "_core", None)
    if core is None:  # numpy 1: numpy.core
        core = np.core
    return getattr(getattr(core, module), name)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # How Python 3's protocol-2 pickles write bytes (``_codecs.encode(str, 'latin1')``); no other codec is admitted.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with the codec {encoding[:40]!r}, which CIFAR files never use")
    return codecs.encode(text, "latin1")


# (module, name) -> what the CIFAR pickles may call: the official files (Python 2, protocol 2) reference numpy's
# array reconstructor, ndarray and dtype; re-pickled copies (Python 3) may use _frombuffer or _codecs.encode.
_ADMITTED = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_function("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_function("multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_function("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_function("numeric", "_frombuffer"),
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that admits only :data:`_ADMITTED`: a file asking for any other global is refused before
    anything of it runs."""

    def find_class(self, module: str, name: str) -> Any:
        admitted = _ADMITTED.get((module, name))
        if admitted is None:
            raise pickle.UnpicklingError(
                f"it asks for {module[:60]}.{name[:60]}, which the official CIFAR files never hold; it is refused "
                "because loading it could run code (a crafted or foreign file)"
            )
        return admitted()


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is made only of what CIFAR files hold (no object arrays, nothing nested deep)."""
    if isinstance(value, np.ndarray):
        return not value.dtype.hasobject
    if isinstance(value, bytes | str | int | float):
        return True
    if isinstance(value, list | tuple) and depth < 2:
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 2:
        return all(isinstance(k, bytes | str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _unpickle(path: Path) -> dict[str, Any]:
    # The official files were written by Python 2: keys (and strings) are bytes.
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(io.BufferedReader(f), encoding="bytes").load()
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(f"{path}: {error}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error, OverflowError) as e:
        raise ValueError(f"{path}: not a CIFAR pickle ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(d, dict) or not _plain(d):
        what = "holds other values than bytes, numbers, lists and numeric arrays" if isinstance(d, dict) else (
            f"is a pickled {type(d).__name__}"
        )  # fmt: skip
        raise ValueError(f"{path}: {what}, not the dict of a CIFAR batch")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if "data" not in d or label_key not in d:
        raise ValueError(f"{path}: expected keys b'data' and b'{label_key}', found {sorted(d)}")
    data = np.asarray(d["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be (N, 3072) uint8, got {data.shape}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planar CHW rows -> HWC
    labels = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def read_cifar10_pickle(folder: str | Path) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) from a ``cifar-10-batches-py`` folder (``data_batch_1..5``, ``test_batch``)."""
    folder = Path(folder)
    batches = [_read_batch(folder / f"data_batch_{i}", "labels") for i in range(1, 6)]
    x_test, y_test = _read_batch(folder / "test_batch", "labels")
    x_train = np.concatenate([b[0] for b in batches])
    y_train = np.concatenate([b[1] for b in batches])
    return ArrayDataset(x_train, y_train, 10), ArrayDataset(np.ascontiguousarray(x_test), y_test, 10)


def read_cifar100_pickle(folder: str | Path) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) from a ``cifar-100-python`` folder (``train``, ``test``; the 100 fine labels)."""
    folder = Path(folder)
    x_train, y_train = _read_batch(folder / "train", "fine_labels")
    x_test, y_test = _read_batch(folder / "test", "fine_labels")
    return (
        ArrayDataset(np.ascontiguousarray(x_train), y_train, 100),
        ArrayDataset(np.ascontiguousarray(x_test), y_test, 100),
    )


# ---------------------------------------------------------------------------------------------------------------
# .npz arrays
# ---------------------------------------------------------------------------------------------------------------
_SPLIT_ALIASES = {"train": ("train",), "test": ("test",), "valid": ("valid", "val", "validation")}
_KIND_ALIASES = {"x": ("x", "images", "data"), "y": ("y", "labels", "targets")}


def _find_key(keys: dict[str, str], split: str, kind: str) -> str | None:
    for s in _SPLIT_ALIASES[split]:
        for k in _KIND_ALIASES[kind]:
            for candidate in (f"{k}_{s}", f"{s}_{k}"):
                if candidate in keys:
                    return keys[candidate]
    return None


def _as_hwc_uint8(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 2 and x.shape[1] == 3 * 32 * 32:
        x = x.reshape(-1, 3, 32, 32)
    if x.ndim == 4 and x.shape[1:] == (3, 32, 32):
        x = x.transpose(0, 2, 3, 1)
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise ValueError(f"{where}: expected images (N, 32, 32, 3), (N, 3, 32, 32) or (N, 3072), got {x.shape}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"{where}: expected uint8 images (0..255), got {x.dtype}; convert before saving")
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(f"{where}: integer images must lie in 0..255, got [{x.min()}, {x.max()}]")
        x = x.astype(np.uint8)
    return np.ascontiguousarray(x)


def _decode_jpegs(buffer: np.ndarray, offsets: np.ndarray, where: str) -> np.ndarray:
    """(N, 32, 32, 3) uint8 from N JPEG files packed in ``buffer`` (image i: ``buffer[offsets[i]:offsets[i+1]]``)."""
    from concurrent.futures import ThreadPoolExecutor
    from io import BytesIO

    from PIL import Image

    if buffer.ndim != 1 or buffer.dtype != np.uint8:
        raise ValueError(f"{where}: the JPEG bytes must be one uint8 array, got {buffer.dtype} {buffer.shape}")
    if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"{where}: offsets must be integers (N+1,), got {offsets.dtype} {offsets.shape}")
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(buffer) or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{where}: offsets must rise from 0 to the buffer's length ({len(buffer)} bytes)")
    offsets = offsets.astype(np.int64)

    def decode(i: int) -> np.ndarray:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below by its size
                image = Image.open(BytesIO(buffer[offsets[i] : offsets[i + 1]].tobytes()))
                if image.size != (32, 32):  # read from the header: nothing is decoded yet
                    raise ValueError(f"is {image.size[0]}x{image.size[1]} pixels, not 32x32")
                return np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"{where}: image {i} cannot be read as a 32x32 JPEG ({str(error)[:120]})") from None

    with ThreadPoolExecutor() as pool:  # Pillow decodes without the GIL
        images = list(pool.map(decode, range(len(offsets) - 1), chunksize=512))
    return _as_hwc_uint8(np.stack(images) if images else np.zeros((0, 32, 32, 3), np.uint8), where)


def _open_npz(path: Path) -> Any:
    """``np.load`` of an ``.npz`` archive (never a pickle), refusing a ``.npy`` array renamed ``.npz``."""
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: is one .npy array {getattr(loaded, 'shape', '')}, not an .npz archive of named "
                         "arrays (x_train, y_train, x_test, y_test); save it with np.savez")  # fmt: skip
    return loaded


def _member(z: Any, key: str, path: Path) -> np.ndarray:
    """One array of an open ``.npz``; a damaged member (bad zlib data, a cut file) as a ValueError naming it."""
    try:
        return z[key]
    except (zlib.error, EOFError, zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path}[{key}]: the array cannot be read ({type(error).__name__}: {error})") from None


def npz_is_lossy(path: str | Path) -> bool:
    """Whether an ``.npz`` holds JPEG bytes rather than pixels (decoded on load: lossy)."""
    with _open_npz(Path(path)) as z:
        return "jpeg_train" in {k.lower() for k in z.files}


def read_npz(path: str | Path, num_classes: int | None = None) -> dict[str, ArrayDataset]:
    """The splits of an ``.npz`` file (layout in the module docstring): ``train``, ``test``, ``valid`` if present."""
    path = Path(path)
    with _open_npz(path) as z:
        keys = {k.lower(): k for k in z.files}
        out: dict[str, ArrayDataset] = {}
        for split in ("train", "test", "valid"):
            kx, ky = _find_key(keys, split, "x"), _find_key(keys, split, "y")
            jpeg, offsets = keys.get(f"jpeg_{split}"), keys.get(f"offsets_{split}")
            if kx is None and jpeg is not None and offsets is not None:
                kx = jpeg
            if kx is None or ky is None:
                if split == "valid":
                    continue
                raise ValueError(f"{path}: no {split} arrays; expected keys x_{split}, y_{split}, found {z.files}")
            if kx == jpeg:
                x = _decode_jpegs(_member(z, jpeg, path), _member(z, offsets, path), f"{path}[{jpeg}]")
            else:
                x = _as_hwc_uint8(_member(z, kx, path), f"{path}[{kx}]")
            y = _member(z, ky, path)
            if y.ndim == 2 and y.shape[1] == 1:
                y = y[:, 0]
            if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"{path}[{ky}]: expected integer labels (N,), got {y.dtype} {y.shape}")
            out[split] = ArrayDataset(x, y.astype(np.int64), num_classes)
    if num_classes is None:  # infer one class count for all splits
        c = max(d.num_classes for d in out.values())
        out = {k: ArrayDataset(d.images, d.labels, c) for k, d in out.items()}
    return out


# ---------------------------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------------------------
def _candidates(name: str, root: Path) -> list[Path]:
    folder, _, npz, sub = _LAYOUT[name]
    return [root / folder, root / npz, root / sub / folder, root / sub / npz, root / sub, root]


def _is_pickle_folder(name: str, path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in _LAYOUT[name][1])


def find_cifar(name: str, roots: list[Path]) -> tuple[Path | None, list[Path]]:
    """The first pickle folder or ``.npz`` file of ``name`` under ``roots``, and every path tried."""
    tried = dedupe([c for root in roots for c in _candidates(name, root)])
    for path in tried:
        if _is_pickle_folder(name, path) or (path.is_file() and path.suffix == ".npz"):
            return path, tried
    return None, tried


def _layouts(name: str) -> list[str]:
    folder, _, npz, sub = _LAYOUT[name]
    pickled = "data_batch_1..5, test_batch" if name == "cifar10" else "train, test, meta"
    return [
        f"<dir>/{folder}/ ({pickled}: the python version from {CIFAR_URL})",
        f"<dir>/{npz} (x_train (N,32,32,3) uint8, y_train (N,), x_test, y_test)",
        f"<dir>/{sub}/{folder}/ or <dir>/{sub}/{npz}",
    ]


def download_cifar(name: str, root: Path) -> None:
    """Fetch ``name`` with torchvision into ``root`` (it extracts ``cifar-10-batches-py`` / ``cifar-100-python``)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    check_host_reachable(cls.url)
    root.mkdir(parents=True, exist_ok=True)
    with network_timeout():
        cls(root=str(root), train=True, download=True)


def load_cifar(name: str, roots: list[Path], *, download: bool = False) -> DatasetSplits:
    """Find (or download) CIFAR-10/100 under ``roots`` and read it."""
    path, tried = find_cifar(name, roots)
    if path is None and download:
        try:
            download_cifar(name, roots[0])
        except Exception as e:  # network, disk or checksum failure: report it with the paths tried
            raise not_found(name, tried, _layouts(name), roots, reason=f"{type(e).__name__}: {e}") from e
        path, tried = find_cifar(name, roots)
    if path is None:
        raise not_found(name, tried, _layouts(name), roots)
    stats = dataset_stats(name)
    if path.is_file():
        splits = read_npz(path, stats.num_classes)
        train, test, kind = splits["train"], splits["test"], "npz"
    else:
        reader = read_cifar10_pickle if name == "cifar10" else read_cifar100_pickle
        (train, test), kind = reader(path), "pickle"
    if len(train) < 2 or len(test) < 1:  # BatchNorm trains on batches of two or more; the test needs an image
        raise ValueError(f"{path}: holds {len(train)} training and {len(test)} test images; a run needs at least 2 "
                         "training images (BatchNorm trains on batch statistics) and 1 test image")  # fmt: skip
    lossy = path.is_file() and npz_is_lossy(path)
    provenance = describe(path, name, len(train), len(test), lossy=lossy)
    source = f"{path.absolute()} ({kind})" + ("" if provenance.official else f" [{provenance.label}]")
    return DatasetSplits(train, test, stats.num_classes, stats.mean, stats.std, name, source, provenance=provenance)


@register_dataset("cifar10")
def build_cifar10(roots: list[Path], *, download: bool = False, seed: int = 0) -> DatasetSplits:
    return load_cifar("cifar10", roots, download=download)


@register_dataset("cifar100")
def build_cifar100(roots: list[Path], *, download: bool = False, seed: int = 0) -> DatasetSplits:
    return load_cifar("cifar100", roots, download=download)
