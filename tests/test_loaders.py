"""The device-delivering loaders behind ``--loader``: gpu and torch here (CPU), the fused Triton kernel in the
interpreter, the factory and ``auto``; ``test_loaders_dali.py`` / ``test_loaders_ffcv.py`` run the same checks on
the optional loaders through the ``check_*`` helpers below.

Every loader follows the torch loader's epoch plan, so the strongest check is equality with the reference batch
for batch (:func:`check_matches_reference`); the others test the properties one by one, as the issue lists them.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from okdfast.data import ArrayDataset, DatasetNotFoundError, DatasetSplits, build_data_loaders, load_dataset
from okdfast.data import factory as factory_module
from okdfast.data.factory import CPU_AUTO, resolve_loader

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
# Per-loader tolerance against the reference: gpu, torch and ffcv run the reference's own ops (bit-equal); DALI
# normalises as (v - 255 m) / (255 s).
ATOL = {"torch": 0.0, "gpu": 0.0, "ffcv": 0.0, "dali": 2e-6}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ---------------------------------------------------------------------------------------------------------------
# data that checks itself
# ---------------------------------------------------------------------------------------------------------------
def splits_of(images: np.ndarray, labels: np.ndarray, num_classes: int = 10, name: str = "toy") -> DatasetSplits:
    ds = ArrayDataset(images, labels, num_classes)
    return DatasetSplits(ds, ds, num_classes, MEAN, STD, name, "test")


def coded_splits(n: int, num_classes: int = 10, name: str = "coded") -> DatasetSplits:
    """Uniform images that carry their own index (R = idx % 256, G = idx // 256) and label (B): crop/flip-proof."""
    idx = np.arange(n)
    labels = (idx * 7 + 3) % num_classes
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    images[..., 0] = (idx % 256)[:, None, None]
    images[..., 1] = (idx // 256)[:, None, None]
    images[..., 2] = labels[:, None, None]
    return splits_of(images, labels, num_classes, name)


def gradient_splits(n: int, name: str = "gradient") -> DatasetSplits:
    """R = 8 * row, G = 8 * column of the source pixel: the centre of an output reveals its crop corner and flip."""
    ar = np.arange(32, dtype=np.uint8) * 8
    image = np.stack([np.repeat(ar[:, None], 32, 1), np.repeat(ar[None, :], 32, 0), np.full((32, 32), 255)], -1)
    return splits_of(np.broadcast_to(image, (n, 32, 32, 3)).astype(np.uint8), np.zeros(n, dtype=np.int64), 10, name)


def decode_centre(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) normalised -> (B, 3) int64 byte values of the centre pixel (inside the image after any crop)."""
    m, s = torch.tensor(MEAN), torch.tensor(STD)
    return ((x[:, :, 16, 16].float().cpu() * s + m) * 255).round().to(torch.int64)


def image_index(x: torch.Tensor) -> torch.Tensor:
    v = decode_centre(x)
    return v[:, 0] + 256 * v[:, 1]


def make(splits: DatasetSplits, loader: str, tmp_path: Path | None = None, **options):
    options.setdefault("num_workers", 0 if loader == "torch" else 1)
    options.setdefault("verbose", False)
    if loader == "ffcv":
        options.setdefault("cache_dir", tmp_path)
    return build_data_loaders(splits, loader=loader, **options)


def epoch(loader, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(e)
    return [(x.clone(), y.clone()) for x, y in loader]  # clone: no loader may hand out a buffer it reuses


def same(a: list, b: list, atol: float = 0.0) -> bool:
    if len(a) != len(b):
        return False
    for (x1, y1), (x2, y2) in zip(a, b):
        if x1.shape != x2.shape or not torch.equal(y1.cpu(), y2.cpu()):
            return False
        if not (torch.equal(x1.cpu(), x2.cpu()) if atol == 0 else torch.allclose(x1.cpu(), x2.cpu(), 0, atol)):
            return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# checks shared by every loader (test_loaders_dali.py and test_loaders_ffcv.py call them too)
# ---------------------------------------------------------------------------------------------------------------
def check_shapes_dtype_and_layout(loader: str, tmp_path: Path) -> None:
    s = coded_splits(300)
    for channels_last, dtype in ((False, torch.float32), (True, torch.float32), (True, torch.bfloat16)):
        train, test = make(
            s, loader, tmp_path, batch_size=64, eval_batch_size=128, channels_last=channels_last, dtype=dtype
        )
        assert (len(train), len(test)) == (5, 3)
        batches = epoch(train, 0)
        assert [len(y) for _, y in batches] == [64, 64, 64, 64, 44]
        assert [len(y) for _, y in epoch(test, 0)] == [128, 128, 44]  # evaluation never drops the tail
        x, y = batches[0]
        assert x.shape == (64, 3, 32, 32) and x.dtype == dtype and y.dtype == torch.int64
        assert x.device.type == "cpu" and y.device.type == "cpu"
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert x.is_contiguous(memory_format=fmt)
    train, _ = make(s, loader, tmp_path, batch_size=64, drop_last=True)
    assert len(train) == 4 and [len(y) for _, y in epoch(train, 1)] == [64] * 4


def check_matches_reference(loader: str, splits: DatasetSplits, tmp_path: Path, epochs=(0, 3), **options) -> None:
    """Batch for batch equal to the torch reference (order, labels, crop, flip, normalisation), train and test."""
    options.setdefault("batch_size", 64)
    options.setdefault("seed", 7)
    train, test = make(splits, loader, tmp_path, **options)
    ref_train, ref_test = make(splits, "torch", **options)
    for e in epochs:
        assert same(epoch(train, e), epoch(ref_train, e), ATOL[loader]), f"{loader} epoch {e}"
    assert same(epoch(test, 0), epoch(ref_test, 0), ATOL[loader])


def check_label_alignment_and_reshuffle(loader: str, tmp_path: Path) -> None:
    s = coded_splits(600)
    train, _ = make(s, loader, tmp_path, batch_size=64, seed=5)
    orders = []
    for e in (2, 3):
        seen = []
        for x, y in epoch(train, e):
            v = decode_centre(x)
            assert torch.equal(v[:, 2], y)  # the label written in the pixels is the label returned
            idx = v[:, 0] + 256 * v[:, 1]
            assert torch.equal(torch.from_numpy(s.train.labels)[idx], y)
            seen.append(idx)
        order = torch.cat(seen)
        assert torch.equal(order.sort().values, torch.arange(600))  # every image exactly once
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])  # a fresh permutation per epoch


def check_seed_determinism(loader: str, tmp_path: Path) -> None:
    s = coded_splits(256)
    a, _ = make(s, loader, tmp_path, batch_size=32, seed=9)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    e4 = epoch(a, 4)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    b, _ = make(s, loader, tmp_path, batch_size=32, seed=9)
    assert same(epoch(b, 4), e4)  # epoch 4 without running 0..3: a pure function of (seed, epoch)
    c, _ = make(s, loader, tmp_path, batch_size=32, seed=10)
    assert not same(epoch(c, 4), e4)
    # An epoch left unfinished (a mid-epoch resume's islice, max_steps) does not disturb the next one.
    a.set_epoch(5)
    it = iter(a)
    next(it), next(it)
    del it
    assert same(epoch(a, 4), e4)


def check_augmentation_statistics(loader: str, tmp_path: Path, n: int = 2048, epochs: int = 4, **options) -> None:
    """Flip rate 1/2 and crop corners uniform over the 81 positions (chi-square), decoded from the pixels."""
    train, _ = make(gradient_splits(n), loader, tmp_path, batch_size=256, seed=0, **options)
    tops, lefts, flips = [], [], []
    for e in range(epochs):
        xs = torch.cat([x for x, _ in epoch(train, e)]).float().cpu()
        m, sd = torch.tensor(MEAN).view(1, 3, 1), torch.tensor(STD).view(1, 3, 1)
        centre = ((xs[:, :, 16, 16:18] * sd + m) * 255).round().to(torch.int64) // 8  # (N, 3, 2)
        flip = centre[:, 1, 1] < centre[:, 1, 0]
        tops.append(centre[:, 0, 0] - 12)
        lefts.append(torch.where(flip, centre[:, 1, 0] - 11, centre[:, 1, 0] - 12))
        flips.append(flip)
    top, left, flip = torch.cat(tops), torch.cat(lefts), torch.cat(flips)
    total = len(flip)
    assert top.min() >= 0 and top.max() <= 8 and left.min() >= 0 and left.max() <= 8
    assert abs(flip.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / total)
    counts = torch.bincount(top * 9 + left, minlength=81).double()
    expected = total / 81
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 140 and counts.min() > 0  # 80 degrees of freedom: mean 80, sd 12.6; p(chi2 > 140) ~ 1e-4


def check_ddp_sharding(loader: str, tmp_path: Path) -> None:
    s = coded_splits(101)
    shards_train, shards_test = [], []
    for rank in range(2):
        train, test = make(s, loader, tmp_path, batch_size=16, seed=3, distributed=(rank, 2))
        ref_train, _ = make(s, "torch", batch_size=16, seed=3, distributed=(rank, 2))
        assert train.num_samples == 51 and len(train) == 4
        got = epoch(train, 1)
        assert same(got, epoch(ref_train, 1), ATOL[loader])  # the reference's padding and striding
        shards_train.append(torch.cat([image_index(x) for x, _ in got]))
        shards_test.append(torch.cat([image_index(x) for x, _ in epoch(test, 0)]))
    both = torch.cat(shards_train)
    assert len(both) == 102 and set(both.tolist()) == set(range(101))  # complete; padded by one repeat
    assert len(set(shards_train[0].tolist()) & set(shards_train[1].tolist())) <= 1  # disjoint but for the pad
    assert sorted(torch.cat(shards_test).tolist()) == list(range(101))  # test shards: exact, no padding


REAL_FILES = {"cifar10": "cifar10-mini.npz", "cifar100": "cifar100-mini.npz"}  # real pixels (../shared/data)


def real_splits(name: str, n: int = 400) -> DatasetSplits:
    """A seeded subset of a real data set: the full one from ../shared/data when there, else its mini file
    (official pixels); a clean skip when neither is there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no real data: {SHARED_DATA} does not exist")
    for data_dir in (SHARED_DATA, SHARED_DATA / REAL_FILES.get(name, "-")):
        try:
            return load_dataset(name, data_dir=data_dir, subset=n, seed=0)
        except DatasetNotFoundError:
            continue
    pytest.skip(f"{name} is not under {SHARED_DATA}")


def write_cinic_folder(root: Path, per_class: int = 3) -> dict[str, np.ndarray]:
    """A CINIC-10-shaped ImageFolder of random 32x32 PNGs (one greyscale, as some CINIC images are)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    written = {}
    for split in ("train", "valid", "test"):
        xs = []
        for label, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                x = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                if i == 0 and label == 3:
                    x = np.repeat(x[..., :1], 3, axis=-1)
                    Image.fromarray(x[..., 0], mode="L").save(root / split / cls / f"n{i:03d}.png")
                else:
                    Image.fromarray(x).save(root / split / cls / f"n{i:03d}.png")
                xs.append(x)
        written[split] = np.stack(xs)
    return written


def check_cinic_end_to_end(loader: str, tmp_path: Path, **options) -> None:
    write_cinic_folder(tmp_path / "cinic10")
    s = load_dataset("cinic10", data_dir=tmp_path, include_valid=True)
    assert s.files is not None and len(s.files["train"]) == len(s.train) == 60
    assert s.mean == (0.47889522, 0.47227842, 0.43047404)
    check_matches_reference(loader, s, tmp_path, epochs=(1,), batch_size=16, eval_batch_size=7, **options)


# ---------------------------------------------------------------------------------------------------------------
# gpu (on CPU tensors) and torch
# ---------------------------------------------------------------------------------------------------------------
CPU_LOADERS = ["gpu", "torch"]


@pytest.mark.parametrize("loader", CPU_LOADERS)
def test_shapes_dtype_and_layout(loader, tmp_path):
    check_shapes_dtype_and_layout(loader, tmp_path)


def test_gpu_loader_matches_the_torch_reference_on_synthetic(tmp_path):
    s = load_dataset("synthetic", train_size=400, test_size=100)
    check_matches_reference("gpu", s, tmp_path, channels_last=True)


def test_torch_loader_with_workers_equals_in_process():
    s = coded_splits(200)
    a, _ = make(s, "torch", batch_size=32, num_workers=2, seed=1)
    b, _ = make(s, "torch", batch_size=32, num_workers=0, seed=1)
    assert same(epoch(a, 2), epoch(b, 2))


@pytest.mark.parametrize("loader", CPU_LOADERS)
def test_label_alignment_and_reshuffle(loader, tmp_path):
    check_label_alignment_and_reshuffle(loader, tmp_path)


@pytest.mark.parametrize("loader", CPU_LOADERS)
def test_seed_determinism(loader, tmp_path):
    check_seed_determinism(loader, tmp_path)


def test_gpu_loader_augmentation_statistics(tmp_path):
    check_augmentation_statistics("gpu", tmp_path)  # torch's: tests/test_data.py (the same plan)


def test_gpu_loader_ddp_sharding(tmp_path):
    check_ddp_sharding("gpu", tmp_path)


@pytest.mark.parametrize("loader", CPU_LOADERS)
def test_cinic10_end_to_end(loader, tmp_path):
    check_cinic_end_to_end(loader, tmp_path)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_real_data_matches_the_reference(name, tmp_path):
    check_matches_reference("gpu", real_splits(name), tmp_path, epochs=(0,), channels_last=True)


def test_repeat_without_set_epoch_warns_once():
    train, _ = make(coded_splits(64), "gpu", batch_size=32)
    epoch(train, 0)
    with pytest.warns(UserWarning, match="set_epoch"):
        list(train)


# ---------------------------------------------------------------------------------------------------------------
# factory, auto and the optional packages
# ---------------------------------------------------------------------------------------------------------------
def test_auto_on_cpu_picks_the_measured_choice_and_says_so(capsys):
    s = coded_splits(64)
    assert resolve_loader("auto", s, torch.device("cpu"))[0] == CPU_AUTO == "torch"
    train, test = build_data_loaders(s, loader="auto", batch_size=32, num_workers=0)
    assert "--loader auto -> torch" in capsys.readouterr().out
    assert train.name == test.name == "torch"
    with pytest.raises(ValueError, match="choose one of auto, gpu, dali, ffcv, torch"):
        build_data_loaders(s, loader="fast", batch_size=32)
    with pytest.raises(ValueError, match="batch_size"):
        build_data_loaders(s, loader="gpu", batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        build_data_loaders(s, loader="gpu", batch_size=8, dtype=torch.float64)


def test_a_missing_optional_package_gives_one_line(monkeypatch, capsys):
    from okdfast.config import parse_config

    monkeypatch.setattr(factory_module, "_present", lambda module: False)
    for loader, words in (("dali", "pip install nvidia-dali-cuda130"), ("ffcv", "pip install ffcv numba")):
        with pytest.raises(ImportError) as info:
            build_data_loaders(coded_splits(16), loader=loader, batch_size=8)
        assert words in str(info.value) and "\n" not in str(info.value)
        assert info.value.__cause__ is None and info.value.__context__ is None
        with pytest.raises(SystemExit):
            parse_config(["--loader", loader, "--dataset", "synthetic"])
        err = capsys.readouterr().err
        assert f"--loader {loader}" in err and words in err and "Traceback" not in err
    # auto never picks a missing package
    assert resolve_loader("auto", coded_splits(16), torch.device("cpu"))[0] == CPU_AUTO == "torch"


def test_config_loader_flag():
    from okdfast.config import TrainConfig, parse_config

    assert TrainConfig().loader == "auto"
    config, _ = parse_config(["--loader", "gpu", "--dataset", "synthetic"])
    assert config.loader == "gpu"
    with pytest.raises(SystemExit):
        parse_config(["--loader", "nope"])


# ---------------------------------------------------------------------------------------------------------------
# the fused Triton kernel, in the CPU interpreter (a subprocess: TRITON_INTERPRET is read at import)
# ---------------------------------------------------------------------------------------------------------------
_KERNEL_SCRIPT = r"""
import torch
from okdfast.ops.dispatch import triton_runs_on
from okdfast.data.transforms import crop_flip_normalize as reference, normalize_lut, sample_crop_flip
from okdfast.kernels.augment import crop_flip_normalize as fused

assert triton_runs_on(torch.device("cpu"))
mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
g = torch.Generator().manual_seed(0)
for (n, h, w, c), b in (((50, 32, 32, 3), 37), ((9, 20, 24, 3), 5), ((7, 32, 32, 1), 4)):
    m, s = mean[:c], std[:c]
    images = torch.randint(0, 256, (n, h, w, c), generator=g, dtype=torch.uint8)
    index = torch.randint(0, n, (b,), generator=g)
    top, left, flip = sample_crop_flip(b, g)
    top[:2], left[:2], flip[:2] = torch.tensor([0, 8]), torch.tensor([8, 0]), torch.tensor([True, False])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        lut = normalize_lut(m, s, dtype)
        for cl in (False, True):
            for args in ((top, left, flip), (None, None, None)):
                got = fused(images, index, *args, lut, channels_last=cl)
                want = reference(images, index, *args, m, s, dtype=dtype, channels_last=cl)
                fmt = torch.channels_last if cl else torch.contiguous_format
                assert got.dtype == want.dtype and got.is_contiguous(memory_format=fmt)
                assert torch.equal(got, want), ((n, h, w, c), dtype, cl, args[0] is None)
# validation at the boundary: nothing out of bounds reaches the kernel
for bad, match in ((dict(index=torch.tensor([50])), "index"), (dict(top=torch.full((37,), 9)), "top/left")):
    kw = dict(index=torch.arange(37), top=torch.zeros(37, dtype=torch.int64), left=torch.zeros(37, dtype=torch.int64),
              flip=torch.zeros(37, dtype=torch.bool))
    kw.update(bad)
    kw["top"] = kw["top"][: len(kw["index"])]; kw["left"] = kw["left"][: len(kw["index"])]
    kw["flip"] = kw["flip"][: len(kw["index"])]
    try:
        fused(torch.zeros((50, 32, 32, 3), dtype=torch.uint8), kw["index"], kw["top"], kw["left"], kw["flip"],
              normalize_lut(mean, std))
    except ValueError as e:
        assert match in str(e), e
    else:
        raise AssertionError(f"no error for {bad}")
# the gpu loader with the kernel forced equals the torch loader
from okdfast.data import load_dataset, build_data_loaders
splits = load_dataset("synthetic", train_size=100, test_size=40)
for dtype, cl in ((torch.float32, True), (torch.bfloat16, False)):
    opts = dict(batch_size=32, seed=2, channels_last=cl, dtype=dtype, num_workers=0, verbose=False)
    a, at = build_data_loaders(splits, loader="gpu", **opts)
    r, rt = build_data_loaders(splits, loader="torch", **opts)
    assert a.delivery == r.delivery
    for la, lr in ((a, r), (at, rt)):
        la.set_epoch(3), lr.set_epoch(3)
        for (x1, y1), (x2, y2) in zip(la, lr, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.stride() == x2.stride()
print("OK")
"""


@pytest.mark.triton
def test_fused_kernel_equals_the_reference_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OKDFAST_FORCE_TRITON="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", _KERNEL_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------------
# on a CUDA device (the gpu tier: pytest -m gpu)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("loader", ["gpu", "torch", "dali", "ffcv"])
@pytest.mark.parametrize(("channels_last", "dtype"), [(True, torch.float32), (False, torch.bfloat16)])
def test_cuda_delivery_matches_the_cpu_reference(loader, channels_last, dtype, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if factory_module.install_hint(loader) is not None:
        pytest.skip(factory_module.install_hint(loader))
    s = load_dataset("synthetic", train_size=1000, test_size=300)
    options = dict(batch_size=128, seed=4, channels_last=channels_last, dtype=dtype)
    train, test = make(s, loader, tmp_path, device="cuda", **options)
    ref_train, ref_test = make(s, "torch", **options)
    for got_loader, ref_loader in ((train, ref_train), (test, ref_test)):
        got, ref = epoch(got_loader, 2), epoch(ref_loader, 2)
        assert len(got) == len(ref)
        for (x, y), (xr, yr) in zip(got, ref):
            assert x.is_cuda and y.is_cuda and x.dtype == dtype and y.dtype == torch.int64
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert x.is_contiguous(memory_format=fmt)
            assert torch.equal(y.cpu(), yr)
            tol = ATOL[loader] if dtype == torch.float32 else 1e-2  # bf16: one ulp where DALI's rounding differs
            torch.testing.assert_close(x.cpu(), xr, rtol=0, atol=tol)


@pytest.mark.gpu
def test_auto_on_cuda_picks_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    s = load_dataset("synthetic", train_size=500, test_size=100)
    assert resolve_loader("auto", s, torch.device("cuda", 0))[0] == "gpu"


# ---------------------------------------------------------------------------------------------------------------
# end to end: every loader trains mde to the same result (pytest -m slow; measured table: benchmarks/results/
# loader_train.csv, python -m benchmarks.bench_loader --train)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_loader_trains_mde_to_the_same_result(tmp_path):
    from okdfast.config import TrainConfig
    from okdfast.run.checkpoint_file import safe_load
    from okdfast.train import run

    results = {}
    for loader in ("torch", "gpu", "ffcv", "dali"):
        if factory_module.install_hint(loader) is not None:
            continue
        config = TrainConfig(
            method="mde",
            arch="resnet8",
            dataset="synthetic",
            subset=640,
            epochs=2,
            batch_size=64,
            workers=0,  # no fork in a process that DALI's threads may already run in
            loader=loader,
            deterministic=True,
            progress="off",
            data_dir=str(tmp_path),  # the ffcv .beton files go here
            out=str(tmp_path / loader),
        )
        config.validate()
        summary = run(config)
        results[loader] = (summary["last"], safe_load(tmp_path / loader / "last.pt")["model"])
    reference_metrics, reference_weights = results.pop("torch")
    assert reference_metrics["acc_branch_mean"] > 30.0  # it learned (chance: 10%)
    for loader, (metrics, weights) in results.items():
        if loader == "dali":  # normalisation rounds differently (< 1e-6): the runs drift apart, within noise
            assert abs(metrics["acc_branch_mean"] - reference_metrics["acc_branch_mean"]) < 8.0, loader
            continue
        for name in reference_weights:  # the same batches, bit for bit: the same weights
            assert torch.equal(weights[name], reference_weights[name]), (loader, name)
        scores = [k for k in reference_metrics if k.startswith(("acc_", "test_", "train_", "diversity", "disagree"))]
        assert {k: metrics[k] for k in scores} == {k: reference_metrics[k] for k in scores}, loader
