"""``--loader ffcv`` on the CPU: the ``.beton`` cache, the checks of ``test_loaders.py``, FFCV's native (unseeded)
augmentation. Runs where ``ffcv`` is installed (CI installs the extras), skips elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ffcv", reason="needs FFCV: pip install ffcv numba opencv-python-headless")

from test_loaders import (  # noqa: E402  (after the skip: nothing to import without FFCV)
    check_augmentation_statistics,
    check_cinic_end_to_end,
    check_ddp_sharding,
    check_label_alignment_and_reshuffle,
    check_matches_reference,
    check_seed_determinism,
    check_shapes_dtype_and_layout,
    coded_splits,
    real_splits,
)

from okdfast.data import ArrayDataset, load_dataset  # noqa: E402
from okdfast.data.ffcv_loader import default_cache_dir, ensure_beton  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # One folder for the module: the .beton files are named by content, so the checks share what they write.
    return tmp_path_factory.mktemp("ffcv")


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_beton_written_once_reused_and_rebuilt_when_the_source_changes(tmp_path, capsys):
    s = coded_splits(40)
    path = ensure_beton(s.train, "coded", "train", tmp_path)
    assert path.is_file() and path.name.startswith("okdfast-ffcv-coded-train-")
    assert "writing" in capsys.readouterr().out
    assert ensure_beton(s.train, "coded", "train", tmp_path) == path
    assert "writing" not in capsys.readouterr().out
    images = s.train.images.copy()
    images[3, 0, 0, 0] ^= 1  # one bit of one pixel
    changed = ensure_beton(ArrayDataset(images, s.train.labels, 10), "coded", "train", tmp_path)
    assert changed != path and changed.is_file() and not path.exists()  # the stale file is removed
    assert sorted(p.name for p in tmp_path.iterdir()) == [changed.name]


def test_default_cache_dir_is_next_to_the_data(tmp_path, monkeypatch):
    assert default_cache_dir(tmp_path) == tmp_path
    assert default_cache_dir(tmp_path / "missing").name == "ffcv"  # ~/.cache/okdfast/ffcv
    monkeypatch.setenv("OKDFAST_DATA", str(tmp_path))
    assert default_cache_dir() == tmp_path


def test_shapes_dtype_and_layout(cache):
    check_shapes_dtype_and_layout("ffcv", cache)


def test_matches_the_torch_reference(cache):
    s = load_dataset("synthetic", train_size=400, test_size=100)
    check_matches_reference("ffcv", s, cache, channels_last=True)


def test_label_alignment_and_reshuffle(cache):
    check_label_alignment_and_reshuffle("ffcv", cache)


def test_seed_determinism_and_unfinished_epochs(cache):
    check_seed_determinism("ffcv", cache)


def test_augmentation_statistics(cache):
    check_augmentation_statistics("ffcv", cache)


def test_native_ffcv_augmentation_statistics(cache):
    # FFCV's own RandomHorizontalFlip + RandomTranslate: not reproducible (numba's RNG), statistically the same.
    check_augmentation_statistics("ffcv", cache, ffcv_native_augment=True)


def test_ddp_sharding(cache):
    check_ddp_sharding("ffcv", cache)


def test_cinic10_end_to_end(tmp_path):
    check_cinic_end_to_end("ffcv", tmp_path)
    assert len(list(tmp_path.glob("okdfast-ffcv-cinic10-*.beton"))) == 2  # next to the data: train and test


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_real_data_matches_the_reference(name, cache):
    check_matches_reference("ffcv", real_splits(name), cache, epochs=(0,))


def test_batches_stay_valid_after_the_loop_moves_on(cache):
    from test_loaders import make

    s = coded_splits(300)
    train, _ = make(s, "ffcv", cache, batch_size=16)
    train.set_epoch(0)
    kept = list(train)  # no clone: FFCV reuses its buffers, our last operations must not
    indices = np.concatenate([(x[:, 0, 16, 16] * 0.25 + 0.5).mul(255).round().long().numpy() for x, _ in kept])
    assert len(set(indices.tolist())) > 200  # 300 images, R = idx % 256: distinct, not the last batch repeated
