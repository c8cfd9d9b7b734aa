"""okdfast.data: readers, synthetic data, the batched augmentation and the deterministic torch loaders (CPU)."""

from __future__ import annotations

import math
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from okdfast.data import (
    DATASETS,
    STATS,
    ArrayDataset,
    DatasetNotFoundError,
    DatasetSplits,
    build_data_loaders,
    list_datasets,
    load_dataset,
)
from okdfast.data import cinic as cinic_module
from okdfast.data.locate import ENV_VAR, check_host_reachable, search_roots
from okdfast.data.plan import EpochPlan
from okdfast.data.synthetic import make_synthetic
from okdfast.data.transforms import (
    crop_flip,
    normalize,
    reference_augment,
    reference_crop_flip,
    reference_pipeline,
    sample_crop_flip,
)

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _splits(train: np.ndarray, labels: np.ndarray, num_classes: int = 10, name: str = "toy") -> DatasetSplits:
    ds = ArrayDataset(train, labels, num_classes)
    return DatasetSplits(ds, ds, num_classes, MEAN, STD, name, "test")


def _coded_splits(n: int, num_classes: int = 10) -> DatasetSplits:
    """Uniform images that carry their own index (R = idx % 256, G = idx // 256) and label (B): crop/flip-proof."""
    idx = np.arange(n)
    labels = (idx * 7 + 3) % num_classes
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    images[..., 0] = (idx % 256)[:, None, None]
    images[..., 1] = (idx // 256)[:, None, None]
    images[..., 2] = labels[:, None, None]
    return _splits(images, labels, num_classes)


def _decode_centre(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) normalised -> (B, 3) uint8 values of the centre pixel (always inside the image after a crop)."""
    m, s = torch.tensor(MEAN), torch.tensor(STD)
    return ((x[:, :, 16, 16] * s + m) * 255).round().to(torch.int64)


def _image_index(x: torch.Tensor) -> torch.Tensor:
    v = _decode_centre(x)
    return v[:, 0] + 256 * v[:, 1]


def _epoch(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


# ---------------------------------------------------------------------------------------------------------------
# registry and synthetic data
# ---------------------------------------------------------------------------------------------------------------
def test_registry_names_and_unknown_name():
    assert {"cifar10", "cifar100", "cinic10", "synthetic"} <= set(DATASETS)
    assert list_datasets("cifar*") == ["cifar10", "cifar100"]
    with pytest.raises(ValueError, match="known datasets: .*synthetic"):
        load_dataset("imagenet")


def test_synthetic_deterministic_shapes_and_fast():
    t0 = time.perf_counter()
    a = load_dataset("synthetic", seed=0)
    elapsed = time.perf_counter() - t0
    b = load_dataset("Synthetic", seed=0)
    c = load_dataset("synthetic", seed=1)
    assert elapsed < 5.0  # ~0.5 s on one core; generous for shared CI machines
    assert (len(a.train), len(a.test), a.num_classes, a.name) == (5000, 1000, 10, "synthetic")
    assert a.train.images.shape == (5000, 32, 32, 3) and a.train.images.dtype == np.uint8
    assert a.train.labels.dtype == np.int64 and a.train.labels.min() == 0 and a.train.labels.max() == 9
    assert np.array_equal(a.train.class_counts(), np.full(10, 500))
    assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.test.labels, b.test.labels)
    assert not np.array_equal(a.train.images, c.train.images)
    assert not np.array_equal(a.train.images[:1000], a.test.images)  # train and test are different draws
    x = a.train.images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(a.mean, x.mean(0), atol=1e-9)
    np.testing.assert_allclose(a.std, x.std(0), atol=1e-9)
    assert "seed=0" in a.source


def test_synthetic_options_and_variant():
    s = load_dataset("synthetic", num_classes=4, train_size=400, test_size=80, seed=3)
    assert (len(s.train), len(s.test), s.num_classes) == (400, 80, 4)
    s100 = load_dataset("synthetic100")
    assert s100.num_classes == 100 and len(s100.train) == 10000 and s100.train.labels.max() == 99
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic(num_classes=1)
    with pytest.raises(TypeError):
        load_dataset("synthetic", bogus_option=1)


def test_synthetic_not_separable_by_mean_colour():
    s = load_dataset("synthetic")
    f_train = s.train.images.reshape(len(s.train), -1, 3).mean(1)
    f_test = s.test.images.reshape(len(s.test), -1, 3).mean(1)
    centroids = np.stack([f_train[s.train.labels == c].mean(0) for c in range(10)])
    pred = np.argmin(((f_test[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (pred == s.test.labels).mean()
    assert 0.15 < accuracy < 0.6  # palettes are shared by groups of classes: the texture carries the rest


@pytest.mark.slow
def test_synthetic_learnable_by_small_cnn():
    torch.manual_seed(0)
    s = load_dataset("synthetic")
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    train, test = build_data_loaders(s, loader="torch", batch_size=64, num_workers=0)
    step = 0
    for epoch in range(10):
        train.set_epoch(epoch)
        for x, y in train:
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == 300:
                break
        if step == 300:
            break
    net.eval()
    with torch.no_grad():
        correct = sum((net(x).argmax(1) == y).sum().item() for x, y in test)
    assert correct / len(s.test) > 0.4  # chance is 0.1; measured 0.81 (0.90 at step 200)


# ---------------------------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------------------------
def test_loader_shapes_dtypes_and_normalisation():
    s = load_dataset("synthetic", train_size=300, test_size=100)
    train, test = build_data_loaders(s, loader="torch", batch_size=64, eval_batch_size=40, num_workers=0)
    assert (len(train), len(test)) == (5, 3)
    batches = _epoch(train, 0)
    assert [len(y) for _, y in batches] == [64, 64, 64, 64, 44]
    x, y = batches[0]
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.dtype == torch.int64 and x.device.type == "cpu"
    # The test loader is in order and only normalised: undoing the normalisation gives the uint8 images back.
    xs = torch.cat([x for x, _ in test])
    ys = torch.cat([y for _, y in test])
    m, sd = torch.tensor(s.mean).view(1, 3, 1, 1), torch.tensor(s.std).view(1, 3, 1, 1)
    restored = ((xs * sd + m) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(restored, torch.from_numpy(s.test.images))
    assert torch.equal(ys, torch.from_numpy(s.test.labels))


def test_drop_last_and_argument_checks():
    s = _coded_splits(100)
    assert len(build_data_loaders(s, loader="torch", batch_size=32, num_workers=0, drop_last=True)[0]) == 3
    assert len(build_data_loaders(s, loader="torch", batch_size=32, num_workers=0)[0]) == 4
    with pytest.raises(ValueError, match="batch_size"):
        build_data_loaders(s, loader="torch", batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        build_data_loaders(s, loader="torch", batch_size=8, distributed=(2, 2))
    with pytest.raises(ValueError, match="drop_last"):
        build_data_loaders(s, loader="torch", batch_size=200, drop_last=True)


def test_label_alignment_through_augmentation():
    s = _coded_splits(600)
    train, _ = build_data_loaders(s, loader="torch", batch_size=64, num_workers=0, seed=5)
    seen = []
    for x, y in _epoch(train, 2):
        idx = _image_index(x)
        assert torch.equal(_decode_centre(x)[:, 2], y)  # the label stored in the pixels is the label returned
        assert torch.equal(torch.from_numpy(s.train.labels)[idx], y)
        seen.append(idx)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(600))  # every image exactly once


def test_reshuffle_per_epoch_and_set_epoch_is_pure():
    s = _coded_splits(300)
    a, _ = build_data_loaders(s, loader="torch", batch_size=50, num_workers=0, seed=1)
    e0, e1 = _epoch(a, 0), _epoch(a, 1)
    order0 = torch.cat([y for _, y in e0])
    assert not torch.equal(torch.cat([x for x, _ in e0]), torch.cat([x for x, _ in e1]))
    e2_after = _epoch(a, 2)
    b, _ = build_data_loaders(s, loader="torch", batch_size=50, num_workers=0, seed=1)
    assert _same(_epoch(b, 2), e2_after)  # epoch 2 without running 0 and 1 first
    assert _same(_epoch(b, 0), e0)
    c, _ = build_data_loaders(s, loader="torch", batch_size=50, num_workers=0, seed=2)
    assert not torch.equal(torch.cat([y for _, y in _epoch(c, 0)]), order0)
    with pytest.warns(UserWarning, match="set_epoch"):
        list(c)  # iterated again without set_epoch


def test_determinism_across_workers_and_global_rng():
    s = _coded_splits(256)
    torch.manual_seed(123)
    a, _ = build_data_loaders(s, loader="torch", batch_size=32, num_workers=0, seed=9)
    state = torch.get_rng_state()
    ref = _epoch(a, 4)
    assert torch.equal(torch.get_rng_state(), state)  # the loaders leave the global RNG alone
    torch.manual_seed(999)
    b, _ = build_data_loaders(s, loader="torch", batch_size=32, num_workers=2, seed=9)
    assert _same(_epoch(b, 4), ref)
    assert _same(_epoch(b, 5), _epoch(a, 5))


def test_augmentation_parameters_reach_the_images_and_are_uniform():
    # R = 8 * row, G = 8 * col of the source pixel: the output's centre pixels reveal top, left and flip.
    n = 2048
    ar = np.arange(32, dtype=np.uint8) * 8
    image = np.stack([np.repeat(ar[:, None], 32, 1), np.repeat(ar[None, :], 32, 0), np.full((32, 32), 255)], -1)
    s = _splits(np.broadcast_to(image, (n, 32, 32, 3)).astype(np.uint8), np.zeros(n, dtype=np.int64))
    train, _ = build_data_loaders(s, loader="torch", batch_size=256, num_workers=0, seed=0)
    tops, lefts, flips = [], [], []
    for epoch in range(4):
        train.set_epoch(epoch)
        plan_order, (p_top, p_left, p_flip) = train.plan.order()
        xs = torch.cat([x for x, _ in train])
        m, sd = torch.tensor(MEAN).view(1, 3, 1), torch.tensor(STD).view(1, 3, 1)
        centre = ((xs[:, :, 16, 16:18] * sd + m) * 255).round().to(torch.int64) // 8  # (N, 3, 2)
        flip = centre[:, 1, 1] < centre[:, 1, 0]
        top = centre[:, 0, 0] - 12
        left = torch.where(flip, centre[:, 1, 0] - 11, centre[:, 1, 0] - 12)
        assert torch.equal(top, p_top) and torch.equal(left, p_left) and torch.equal(flip, p_flip)
        tops.append(top), lefts.append(left), flips.append(flip)
    top, left, flip = torch.cat(tops), torch.cat(lefts), torch.cat(flips)
    total = len(flip)
    assert abs(flip.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / total)
    counts = torch.bincount(top * 9 + left, minlength=81).double()
    expected = total / 81
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 140  # 80 degrees of freedom: mean 80, sd 12.6; p(chi2 > 140) ~ 1e-4
    assert counts.min() > 0


def test_batched_augmentation_equals_torchvision_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 32, 32, 3), generator=g, dtype=torch.uint8)
    index = torch.randint(0, 50, (40,), generator=g)
    top, left, flip = sample_crop_flip(40, g)
    top[:4], left[:4], flip[:4] = torch.tensor([0, 8, 0, 8]), torch.tensor([0, 8, 8, 0]), torch.tensor([0, 1, 1, 0])
    batched = crop_flip(images, index, top, left, flip)
    normalised = normalize(batched, MEAN, STD)
    for k in range(40):
        args = (images[index[k]], int(top[k]), int(left[k]), bool(flip[k]))
        assert torch.equal(batched[k], reference_crop_flip(*args))
        assert torch.equal(normalised[k], reference_augment(*args, MEAN, STD))  # same float ops: bit-equal
    # Byte-wise fallback (W*C not a multiple of 8) agrees with the reference too.
    odd = torch.randint(0, 256, (5, 32, 32, 1), generator=g, dtype=torch.uint8)
    out = crop_flip(odd, torch.arange(5), top[:5], left[:5], flip[:5])
    for k in range(5):
        assert torch.equal(out[k], reference_crop_flip(odd[k], int(top[k]), int(left[k]), bool(flip[k])))


def test_random_torchvision_pipeline_is_one_of_the_162_batched_outcomes():
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (1, 32, 32, 3), generator=g, dtype=torch.uint8)
    grid = torch.cartesian_prod(torch.arange(9), torch.arange(9), torch.tensor([0, 1]))
    candidates = normalize(
        crop_flip(image, torch.zeros(162, dtype=torch.int64), grid[:, 0], grid[:, 1], grid[:, 2].bool()), MEAN, STD
    )
    pipeline = reference_pipeline(MEAN, STD)
    torch.manual_seed(0)
    for _ in range(20):
        out = pipeline(image[0].permute(2, 0, 1).contiguous())
        assert (candidates == out).flatten(1).all(1).any()
    plain = reference_pipeline(MEAN, STD, train=False)(image[0].permute(2, 0, 1).contiguous())
    assert torch.equal(plain, normalize(image.permute(0, 3, 1, 2), MEAN, STD)[0])


def test_distributed_shards_are_disjoint_and_complete():
    s = _coded_splits(101)
    shards_train, shards_test = [], []
    for rank in range(2):
        train, test = build_data_loaders(s, loader="torch", batch_size=16, num_workers=0, seed=3, distributed=(rank, 2))
        assert train.num_samples == 51 and len(train) == 4
        shards_train.append(torch.cat([_image_index(x) for x, _ in _epoch(train, 1)]))
        shards_test.append(torch.cat([_image_index(x) for x, _ in test]))
    both = torch.cat(shards_train)
    assert len(both) == 102 and set(both.tolist()) == set(range(101))  # padded by one repeat, like torch's
    assert len(set(shards_train[0].tolist()) & set(shards_train[1].tolist())) <= 1
    assert sorted(torch.cat(shards_test).tolist()) == list(range(101))  # test shards: exact, no padding
    # Padding and striding match torch's DistributedSampler (compared without shuffling: its RNG is its own).
    from torch.utils.data.distributed import DistributedSampler

    for rank in range(2):
        plan = EpochPlan(101, 16, shuffle=False, augment=False, rank=rank, world_size=2)
        ours = plan.order()[0].tolist()
        theirs = list(DistributedSampler(range(101), num_replicas=2, rank=rank, shuffle=False))
        assert ours == theirs


# ---------------------------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------------------------
def _random_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _dump(path: Path, images: np.ndarray, labels: np.ndarray, label_key: bytes, extra: dict | None = None) -> None:
    planar = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # the official R, G, B planes per row
    with open(path, "wb") as f:
        pickle.dump({b"data": planar, label_key: [int(v) for v in labels], **(extra or {})}, f, protocol=2)


def test_cifar10_pickle_reader(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train_x, train_y = _random_images(rng, 20), rng.integers(0, 10, 20)
    test_x, test_y = _random_images(rng, 6), rng.integers(0, 10, 6)
    for i in range(5):
        _dump(folder / f"data_batch_{i + 1}", train_x[4 * i : 4 * i + 4], train_y[4 * i : 4 * i + 4], b"labels")
    _dump(folder / "test_batch", test_x, test_y, b"labels", {b"batch_label": b"testing batch 1 of 1"})
    s = load_dataset("cifar10", data_dir=tmp_path)
    assert np.array_equal(s.train.images, train_x) and np.array_equal(s.train.labels, train_y)
    assert np.array_equal(s.test.images, test_x) and np.array_equal(s.test.labels, test_y)
    assert (s.num_classes, s.mean, s.std, s.name) == (10, STATS["cifar10"].mean, STATS["cifar10"].std, "cifar10")
    assert "cifar-10-batches-py" in s.source
    # the folder itself as data_dir works too
    assert np.array_equal(load_dataset("cifar10", data_dir=folder).test.images, test_x)


def test_cifar100_pickle_reader(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    train_x, train_y = _random_images(rng, 12), rng.integers(0, 100, 12)
    test_x, test_y = _random_images(rng, 5), rng.integers(0, 100, 5)
    _dump(folder / "train", train_x, train_y, b"fine_labels", {b"coarse_labels": [0] * 12})
    _dump(folder / "test", test_x, test_y, b"fine_labels", {b"coarse_labels": [0] * 5})
    s = load_dataset("cifar100", data_dir=tmp_path)
    assert np.array_equal(s.train.images, train_x) and np.array_equal(s.train.labels, train_y)
    assert np.array_equal(s.test.labels, test_y) and s.num_classes == 100 and s.mean == STATS["cifar100"].mean


def test_npz_reader_layouts(tmp_path):
    rng = np.random.default_rng(2)
    x_train, y_train = _random_images(rng, 10), rng.integers(0, 10, 10)
    x_test, y_test = _random_images(rng, 4), rng.integers(0, 10, 4)
    np.savez(tmp_path / "cifar10.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    s = load_dataset("cifar10", data_dir=tmp_path)
    assert np.array_equal(s.train.images, x_train) and np.array_equal(s.test.labels, y_test)
    assert "(npz)" in s.source and s.source.endswith("[CIFAR-10 (partial: 10/50,000 train, 4/10,000 test)]")
    assert s.provenance.partial and s.provenance.path == str((tmp_path / "cifar10.npz").absolute())
    # NCHW images, train_x-style names, (N, 1) int32 labels
    other = tmp_path / "other"
    other.mkdir()
    np.savez(
        other / "cifar10.npz",
        train_x=x_train.transpose(0, 3, 1, 2),
        train_y=y_train[:, None].astype(np.int32),
        TEST_X=x_test.transpose(0, 3, 1, 2),
        test_y=y_test,
    )
    s = load_dataset("cifar10", data_dir=other)
    assert np.array_equal(s.train.images, x_train) and np.array_equal(s.train.labels, y_train)
    assert s.train.labels.dtype == np.int64
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "cifar10.npz", x_train=x_train / 255.0, y_train=y_train, x_test=x_test, y_test=y_test)
    with pytest.raises(ValueError, match="uint8"):
        load_dataset("cifar10", data_dir=bad)


def _write_cinic(root: Path, per_class: int = 2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from PIL import Image

    rng = np.random.default_rng(3)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    written = {}
    for split in ("train", "valid", "test"):
        xs, ys = [], []
        for label, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                x = _random_images(rng, 1)[0]
                if i == 0 and label == 3:  # a greyscale PNG, as some CINIC images are
                    x = np.repeat(x[..., :1], 3, axis=-1)
                    Image.fromarray(x[..., 0], mode="L").save(root / split / cls / f"n{i:03d}.png")
                else:
                    Image.fromarray(x).save(root / split / cls / f"n{i:03d}.png")
                xs.append(x)
                ys.append(label)
        written[split] = (np.stack(xs), np.array(ys))
    return written


def test_cinic_image_folder_reader_and_cache(tmp_path, monkeypatch):
    root = tmp_path / "CINIC-10"
    written = _write_cinic(root)
    s = load_dataset("cinic10", data_dir=tmp_path)
    assert (len(s.train), len(s.test), s.num_classes) == (20, 20, 10)
    assert np.array_equal(s.train.images, written["train"][0]) and np.array_equal(s.train.labels, written["train"][1])
    assert np.array_equal(s.test.images, written["test"][0]) and s.mean == STATS["cinic10"].mean
    assert (root / cinic_module.CACHE_NAME).is_file() and "decoded" in s.source

    def no_decode(path):
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(cinic_module, "_decode", no_decode)
    cached = load_dataset("cinic10", data_dir=tmp_path, include_valid=True)
    assert "cache" in cached.source and len(cached.train) == 40
    assert np.array_equal(cached.train.images[20:], written["valid"][0])
    monkeypatch.undo()
    # A new file invalidates the cache.
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "test" / "ship" / "extra.png")
    rebuilt = load_dataset("cinic10", data_dir=tmp_path)
    assert len(rebuilt.test) == 21 and "decoded" in rebuilt.source


def test_cinic_download_extracts_to_the_layout(tmp_path, monkeypatch):
    import tarfile

    staging = tmp_path / "staging"
    written = _write_cinic(staging / "CINIC-10", per_class=1)
    archive = tmp_path / "CINIC-10.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "CINIC-10", arcname="CINIC-10")  # splits wrapped in one top-level folder
    requested = []

    def fake_urlopen(request, timeout):
        requested.append((request.full_url, timeout))
        return open(archive, "rb")

    monkeypatch.setattr(cinic_module, "check_host_reachable", lambda url, timeout=10.0: None)
    monkeypatch.setattr(cinic_module.urllib.request, "urlopen", fake_urlopen)
    data = tmp_path / "data"
    s = load_dataset("cinic10", data_dir=data, download=True)
    assert requested == [(cinic_module.CINIC10_URL, 10.0)]
    assert np.array_equal(s.test.images, written["test"][0]) and len(s.train) == 10
    assert not (data / "CINIC-10.tar.gz").exists() and not (data / "cinic10.extracting").exists()
    assert len(load_dataset("cinic10", data_dir=data).train) == 10  # found again without downloading


def test_missing_data_fails_fast_with_a_helpful_error(tmp_path):
    for name, expect in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar100.npz"), ("cinic10", "cinic10")):
        t0 = time.perf_counter()
        with pytest.raises(DatasetNotFoundError) as info:
            load_dataset(name, data_dir=tmp_path / "nowhere")
        assert time.perf_counter() - t0 < 5
        message = str(info.value)
        assert isinstance(info.value, FileNotFoundError)
        assert str((tmp_path / "nowhere" / expect).absolute()) in message
        assert "--download" in message and "--dataset synthetic" in message


def test_failed_download_is_reported_as_not_found(tmp_path, monkeypatch):
    from okdfast.data import cifar

    def offline(url, timeout=10.0):
        raise OSError("cannot reach www.cs.toronto.edu:443: offline")

    monkeypatch.setattr(cifar, "check_host_reachable", offline)
    monkeypatch.setattr(cinic_module, "check_host_reachable", offline)
    for name in ("cifar10", "cinic10"):
        with pytest.raises(DatasetNotFoundError, match="Download failed: OSError"):
            load_dataset(name, data_dir=tmp_path, download=True)


def test_unreachable_host_times_out_quickly():
    t0 = time.perf_counter()
    with pytest.raises(OSError):
        check_host_reachable("https://okdfast-test.invalid/x.tar.gz", timeout=2.0)  # .invalid never resolves
    assert time.perf_counter() - t0 < 4


def test_search_roots(tmp_path, monkeypatch):
    assert search_roots(tmp_path) == [tmp_path]
    monkeypatch.setenv(ENV_VAR, f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    assert search_roots() == [tmp_path / "a", tmp_path / "b"]
    monkeypatch.delenv(ENV_VAR)
    assert search_roots() == [Path("./data"), Path("~/.cache/okdfast/data").expanduser()]


def test_subset_sizes_stratified_and_seeded():
    s = load_dataset("synthetic", subset=1000, seed=4)
    assert (len(s.train), len(s.test)) == (1000, 200)
    assert np.array_equal(s.train.class_counts(), np.full(10, 100))
    assert np.array_equal(s.test.class_counts(), np.full(10, 20))
    again = load_dataset("synthetic", subset=1000, seed=4)
    assert np.array_equal(s.train.images, again.train.images)
    full = load_dataset("synthetic", seed=4)
    other = full.subset(1000, seed=5)
    assert not np.array_equal(s.train.images, other.train.images)
    assert len(full.subset(3).test) == 1
    uneven = ArrayDataset(np.zeros((10, 32, 32, 3), np.uint8), np.array([0] * 7 + [1] * 3))
    assert np.array_equal(uneven.subset(5, seed=0).class_counts(), [4, 1])  # 3.5 / 1.5: ties broken by the seed
    with pytest.raises(ValueError, match="exceeds"):
        full.subset(6000)


def _shared_data_dir() -> Path | None:
    for candidate in (os.environ.get("OKDFAST_SHARED_DATA"), Path(__file__).parents[2] / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


# The stratified minis of ../shared/data (its README): name -> (data set, classes, train, test images).
SHARED_MINIS = {"cifar10-mini.npz": ("cifar10", 10, 5000, 800), "cifar100-mini.npz": ("cifar100", 100, 500, 400)}


@pytest.mark.parametrize("file", list(SHARED_MINIS))
def test_shared_cifar_arrays_load(file):
    """The real CIFAR files that are in ../shared/data (partial, official pixels) read as their data set: sizes,
    balanced classes, the known file named, and the published normalisation constants fit the pixels."""
    shared = _shared_data_dir()
    if shared is None or not (shared / file).is_file():
        pytest.skip(f"no {file} in the shared data folder (../shared/data or $OKDFAST_SHARED_DATA)")
    name, num_classes, train, test = SHARED_MINIS[file]
    s = load_dataset(name, data_dir=shared / file)
    assert (len(s.train), len(s.test), s.num_classes) == (train, test, num_classes)
    assert np.array_equal(s.train.class_counts(), np.full(num_classes, train // num_classes))
    assert np.array_equal(s.test.class_counts(), np.full(num_classes, test // num_classes))
    assert s.provenance.known_as == file.removesuffix(".npz") and s.provenance.partial and not s.provenance.lossy
    per_image = s.train.images.reshape(len(s.train), -1, 3).mean(1) / 255.0  # (N, 3) each image's channel means
    measured = per_image.mean(0)
    # The constants are the full set's means; a subset of N images differs by its sampling error, about
    # std(image means) / sqrt(N) per channel: 5 of those is the bound.
    bound = 5 * per_image.std(0) / math.sqrt(len(s.train))
    assert np.all(np.abs(measured - np.asarray(s.mean)) < bound), (measured, s.mean, bound)
