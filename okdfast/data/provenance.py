"""Which data a run trained on: the file (path, sha256), and whether it is the whole official data set.

A result must never be mistaken for one on the official data. So every data set read from files gets a
:class:`DataProvenance`: the path and the sha256 of what was read, whether it is **partial** (fewer images than
the official split) or **lossy** (pixels that are not the official ones, e.g. a JPEG re-encode), and a one-line
``label`` that run summaries, results tables and plot titles carry. Known files (the partial and re-encoded CIFAR
files that circulate for offline work) are recognised by their sha256 and described by name.

A file made from another (the GPU visit decodes ``cifar10-jpeg.npz`` once into a pixel npz, ``benchmarks/full_run.py``)
has a sha256 nobody knows and pixels that look official. So the writer embeds the source's provenance in the file
(:func:`embed` -> an ``okdfast_provenance`` entry of the npz, a JSON string; the readers ignore unknown keys) and
:func:`describe` carries it over: the derived file is lossy when its source was, names it (``derived_from``, its
sha256 in ``source_sha256``), and is partial when it or its source holds fewer images than the official splits.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

EMBEDDED_KEY = "okdfast_provenance"  # the npz entry holding the provenance of the file it was made from
# (train, test) images of the official splits
OFFICIAL_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "cinic10": (90000, 90000)}
PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "cinic10": "CINIC-10"}

# sha256 -> (short name, what it is, lossy): files whose content is known
KNOWN_FILES: dict[str, tuple[str, str, bool]] = {
    "685a583587234ce167f106d4131ae65f2576e6e4177aedd2af861e00bd9dad26": (
        "cifar10-mini",
        "a stratified 5,000 / 800 subset of CIFAR-10 with the official pixels",
        False,
    ),
    "147e2082c8deadad2fb7d56a75f4ffd1543d57b9523ff439d22b9e98494326e9": (
        "cifar100-mini",
        "a stratified 500 / 400 subset of CIFAR-100 with the official pixels",
        False,
    ),
    "79dba1dee257fc3e0ef2742dab44cddc74d8ba3c1e4a3a99783c2d35aa29233b": (
        "cifar10-exact-subset",
        "every CIFAR-10 image with recovered official pixels (8,336 / 1,017), unbalanced",
        False,
    ),
    "559c2ffd785385ca9542c8c61e150c45f2b239422e0be140b8ba93dc05bfe301": (
        "cifar100-exact-subset",
        "every CIFAR-100 image with recovered official pixels (3,556 / 1,372), very unbalanced",
        False,
    ),
    "49d8e1c7af4ee5e98db121f52848554075e3a0cbb9f6a90d4153066e9d9d849c": (
        "cifar10-jpeg",
        "all of CIFAR-10 as a lossy JPEG re-encode (about 30 dB PSNR against the official pixels)",
        True,
    ),
}


@dataclass(frozen=True)
class DataProvenance:
    path: str
    sha256: str  # of the file; of the concatenated member files (sorted by name) for a folder
    dataset: str  # the registered name
    train_images: int
    test_images: int
    partial: bool  # fewer images than the official splits
    lossy: bool  # not the official pixels
    known_as: str | None = None  # the short name of a known file
    derived_from: str | None = None  # the file this one was made from (its known name, else its file name)
    source_sha256: str | None = None  # that file's sha256

    @property
    def official(self) -> bool:
        return not (self.partial or self.lossy)

    @property
    def label(self) -> str:
        """'CIFAR-10' for the official data; else the name and what is not official, for titles and tables."""
        name = PRETTY.get(self.dataset, self.dataset)
        if self.official:
            return name
        what = []
        if self.partial:
            full_train, full_test = OFFICIAL_SIZES.get(self.dataset, (0, 0))
            what.append(f"partial: {self.train_images:,}/{full_train:,} train, {self.test_images:,}/{full_test:,} test")
        if self.lossy:
            what.append("lossy pixels")
        source = f" {self.known_as}" if self.known_as else ""
        if self.derived_from:
            source += f" decoded from {self.derived_from}"
        return f"{name}{source} ({'; '.join(what)})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"official": self.official, "label": self.label}


def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a folder's files (sorted by name, contents concatenated)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def embedded(path: Path) -> dict[str, Any] | None:
    """The provenance record an npz carries of the file it was made from (:func:`embed`), or None."""
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return None
    with zipfile.ZipFile(path) as archive:
        if f"{EMBEDDED_KEY}.npy" not in archive.namelist():
            return None
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z[EMBEDDED_KEY][()]))


def embed(source: DataProvenance) -> dict[str, Any]:
    """The entry to save in an npz made from ``source`` (``np.savez(out, **arrays, **embed(source))``), so that the
    new file keeps the source's provenance (:func:`describe` reads it)."""
    import numpy as np

    return {EMBEDDED_KEY: np.array(json.dumps(source.to_dict()))}


def describe(path: Path, dataset: str, train_images: int, test_images: int, *, lossy: bool = False) -> DataProvenance:
    """The provenance of ``dataset`` read from ``path`` with the given split sizes (``lossy``: decoded from a lossy
    format, e.g. JPEG). A known file adds its name and its known lossiness; a file made from another (an embedded
    record) adds the source's name, lossiness and partiality."""
    sha = sha256_of(path)
    known = KNOWN_FILES.get(sha)
    full_train, full_test = OFFICIAL_SIZES.get(dataset, (train_images, test_images))
    source = embedded(path)
    return DataProvenance(
        path=str(path.resolve()),
        sha256=sha,
        dataset=dataset,
        train_images=train_images,
        test_images=test_images,
        partial=train_images < full_train or test_images < full_test or bool(source and source.get("partial")),
        lossy=lossy or bool(known and known[2]) or bool(source and source.get("lossy")),
        known_as=known[0] if known else None,
        derived_from=(source.get("known_as") or Path(source.get("path", "?")).name) if source else None,
        source_sha256=source.get("sha256") if source else None,
    )
