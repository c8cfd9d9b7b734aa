"""How long the plan takes on this machine, from a measured training speed (images/s) per (method, arch).

Where the speed comes from, in this order (the plan names the source of every row):
1. ``runs``: earlier runs of the same (method, arch) in the output folder: the median images/s of their finished
   epochs (metrics.jsonl), as measured by the training loop itself.
1b. ``speed_runs`` (a table's folders of earlier runs, e.g. benchmarks/results/cifar10-small): the same median over
   the runs of the same method and arch found there (by their config.yaml); ``speed_runs x FLOPs``: such runs of
   another method on the same arch give the FLOP rate on it, scaled as in 3. These speeds were measured on the
   machine that trained those runs.
2. ``probe``: a short timed probe, now: the method's forward + loss + backward + SGD step on random tensors of
   the data set's shape (no data is loaded), warm-up steps, then timed steps for about ``probe_seconds``; the
   speed is the batch over the median step time. Eager mode, the run's AMP and channels-last settings; no
   torch.compile, no data loading: on a GPU a compiled run is faster, a data-bound one slower.
3. ``probe x FLOPs`` (the CPU default, where a probe of every pair takes minutes): one timed probe per
   architecture, of its method with the fewest FLOPs, gives this machine's FLOP rate on that architecture; the
   other methods' speeds are that rate over their own training FLOPs per image, counted by torch's
   FlopCounterMode on the meta device (exact counts of the conv/linear work; the heads' elementwise work and
   memory-bound layers are not counted, so it leans optimistic for methods with heavier heads).

A run's time = remaining epochs x (train images / speed + test images / (3 x speed)) + 10 s start-up + the data
set's load time (``load_seconds`` in the tables file: decoding a JPEG data set). The test pass is forward-only,
about a third of a training step's work per image (an assumption, not a measurement).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from okdfast.config import TrainConfig
from okdfast.reproduce.plan import PlannedRun
from okdfast.utils.metrics_log import read_rows

STARTUP_SECONDS = 10.0  # interpreter + imports + data load + warm-up of one run (a few seconds on a small CPU)
EVAL_SPEEDUP = 3.0  # test images per second / training images per second (assumed)


@dataclass
class Speed:
    images_per_sec: float
    source: str  # 'runs' | 'probe' | 'probe (cached)'
    detail: str  # what was measured


def run_device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _epoch_speeds(run_dir: Path) -> list[float]:
    """images/s of each finished epoch of a run folder (metrics.jsonl), [] without one."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [r["images_per_sec"] for r in read_rows(metrics) if not r.get("partial") and r.get("images_per_sec")]


def measured_speed(runs: list[PlannedRun]) -> Speed | None:
    """Median images/s over the finished epochs of these run folders (the same method and arch)."""
    values: list[float] = []
    names = []
    for run in runs:
        speeds = _epoch_speeds(run.run_dir)
        if speeds:
            values += speeds
            names.append(run.name)
    if not values:
        return None
    return Speed(statistics.median(values), "runs", f"median of {len(values)} epochs of {', '.join(names)}")


@dataclass
class ReferenceRuns:
    """The runs of one (method, arch) in a table's ``speed_runs`` folders, with their stored K."""

    method: str
    arch: str
    branches: int | None
    speeds: list[float]
    names: list[str]

    @property
    def images_per_sec(self) -> float:
        return statistics.median(self.speeds)

    def detail(self) -> str:
        return f"median of {len(self.speeds)} epochs of {len(self.names)} runs ({', '.join(self.names[:3])}...)"


def reference_runs(folders: list[Path]) -> dict[tuple[str, str], ReferenceRuns]:
    """(method, arch) -> the finished epochs' speeds of the runs under ``folders`` (each run: a sub-folder with
    config.yaml and metrics.jsonl, of any name)."""
    found: dict[tuple[str, str], ReferenceRuns] = {}
    for folder in folders:
        for config_file in sorted(Path(folder).glob("*/config.yaml")):
            stored = yaml.safe_load(config_file.read_text()) or {}
            speeds = _epoch_speeds(config_file.parent)
            if not speeds or "method" not in stored or "arch" not in stored:
                continue
            key = (str(stored["method"]), str(stored["arch"]))
            entry = found.setdefault(key, ReferenceRuns(key[0], key[1], stored.get("branches"), [], []))
            entry.speeds += speeds
            entry.names.append(f"{Path(folder).name}/{config_file.parent.name}")
    return found


def settings_key(config: TrainConfig, num_classes: int, batch: int, device: torch.device) -> str:
    """What a probe's speed depends on besides the method: arch, classes, batch, precision, layout, device."""
    resolved = config.resolve_speed_defaults(device.type)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (
        f"{config.arch}|C={num_classes}|batch={batch}|amp={resolved.amp}|channels_last={resolved.channels_last}"
        f"|{name}|torch {torch.__version__}"
    )


def probe_batch(config: TrainConfig, device: torch.device) -> int:
    return config.batch_size if device.type == "cuda" else min(config.batch_size, 32)  # CPU: flat past ~32


def training_flops_per_image(config: TrainConfig, num_classes: int) -> float:
    """FLOPs of one training step (forward + loss + backward) per image, counted by torch's FlopCounterMode on
    the meta device: no memory, no compute, well under a second."""
    from torch.utils.flop_counter import FlopCounterMode

    from okdfast.methods import create_method
    from okdfast.run.assemble import method_config

    with torch.device("meta"):
        method = create_method(config.method, config.arch, num_classes, method_config(config))
        images = torch.empty(2, 3, 32, 32)
        target = torch.zeros(2, dtype=torch.long)
    method.train()
    with FlopCounterMode(display=False) as counter:
        method.loss(method(images), target, 1.0).total.backward()
    return counter.get_total_flops() / 2


def probe_speed(
    config: TrainConfig, num_classes: int, *, probe_seconds: float | None = None, max_steps: int = 20
) -> tuple[float, str]:
    """Times the training step of ``config``'s method and arch on random tensors; returns (images/s, detail)."""
    from okdfast.methods import create_method
    from okdfast.run.assemble import method_config
    from okdfast.run.precision import resolve_amp

    device = run_device(config)
    resolved = config.resolve_speed_defaults(device.type)
    on_cuda = device.type == "cuda"
    batch = probe_batch(config, device)
    probe_seconds = probe_seconds if probe_seconds is not None else (2.0 if on_cuda else 3.0)
    torch.manual_seed(0)
    method = create_method(config.method, config.arch, num_classes, method_config(config)).to(device)
    if resolved.channels_last:
        method = method.to(memory_format=torch.channels_last)
    method.train()
    amp_dtype = resolve_amp(resolved.amp, device)
    optimizer = torch.optim.SGD(method.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(batch, 3, 32, 32, device=device)
    if resolved.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, num_classes, (batch,), device=device)

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            total = method.loss(method(images), target, 1.0).total
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if on_cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    warm = step()  # warm-up: allocator, cuDNN autotune, oneDNN primitives, lazy init
    for _ in range(2 if on_cuda or warm < probe_seconds / 4 else 0):
        step()
    times: list[float] = []
    while len(times) < max_steps and (len(times) < 2 or sum(times) < probe_seconds):
        times.append(step())
    median = statistics.median(times)
    detail = f"{len(times)} timed steps of batch {batch}, median {median * 1e3:.0f} ms/step"
    if not on_cuda and hasattr(os, "getloadavg"):  # other processes on the same cores slow the probe down
        detail += f", load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    return batch / median, detail


class SpeedBook:
    """Speeds per (method, arch) of a plan. ``probe``: 'all' (a timed probe of every (method, arch)), 'arch' (one
    probe per arch, of its method with the fewest FLOPs; the other methods' speeds scaled by their FLOPs per
    training image, counted), 'none' (stored speeds only), 'auto' (all on CUDA, arch on the CPU)."""

    def __init__(
        self, *, probe: str = "auto", probe_seconds: float | None = None, reference_dirs: list[Path] | None = None
    ) -> None:
        self.cache: dict[str, dict[str, Any]] = {}  # this process's probes; a dry run writes nothing
        self.probe = probe
        self.probe_seconds = probe_seconds
        self.references = reference_runs(list(reference_dirs or []))

    def _from_references(self, config: TrainConfig, num_classes: int) -> Speed | None:
        """The speed of the speed_runs of this method and arch, or of another method on the arch scaled by counted
        FLOPs (the one closest in FLOPs); None when no such run has this arch."""
        same = self.references.get((config.method, config.arch))
        if same is not None:
            return Speed(same.images_per_sec, "speed_runs", same.detail())
        others = [r for (_, arch), r in self.references.items() if arch == config.arch]
        if not others:
            return None
        flops = training_flops_per_image(config, num_classes)
        other_flops = {
            r.method: training_flops_per_image(dataclasses.replace(config, method=r.method, branches=r.branches),
                                               num_classes)
            for r in others
        }  # fmt: skip
        ref = min(others, key=lambda r: abs(math.log(other_flops[r.method] / flops)))
        rate = ref.images_per_sec * other_flops[ref.method]
        return Speed(
            rate / flops,
            "speed_runs x FLOPs",
            f"{ref.method} {ref.arch}: {ref.detail()}, {rate / 1e9:.1f} GFLOP/s / {flops / 1e9:.2f} GFLOP per training "
            "image (counted)",
        )

    def _probe(self, config: TrainConfig, num_classes: int, settings: str, report: Callable[[str], None]) -> Speed:
        report(f"probing the training speed of {config.method} {config.arch} ...")
        images_per_sec, detail = probe_speed(config, num_classes, probe_seconds=self.probe_seconds)
        self.cache[f"{config.method}|{settings}"] = {
            "method": config.method,
            "settings": settings,
            "images_per_sec": images_per_sec,
            "flops_per_image": training_flops_per_image(config, num_classes),
            "detail": detail,
        }
        return Speed(images_per_sec, "probe", detail)

    def speeds(
        self,
        groups: dict[tuple[str, str], list[PlannedRun]],
        num_classes: int,
        report: Callable[[str], None] = lambda message: None,
    ) -> dict[tuple[str, str], Speed | None]:
        """``groups``: (method, arch) -> the plan's runs of it. Finished groups need no speed (None)."""
        out: dict[tuple[str, str], Speed | None] = {}
        todo: dict[tuple[str, str], tuple[TrainConfig, str]] = {}
        for key, runs in groups.items():
            measured = measured_speed(runs)
            config = runs[0].config
            device = run_device(config)
            settings = settings_key(config, num_classes, probe_batch(config, device), device)
            if measured is not None:
                out[key] = measured
            elif all(run.status == "finished" for run in runs):
                out[key] = None
            elif (committed := self._from_references(config, num_classes)) is not None:
                out[key] = committed
            else:
                todo[key] = (config, settings)
        mode = self.probe
        if mode == "auto":
            on_cuda = any(run_device(config).type == "cuda" for config, _ in todo.values())
            mode = "all" if on_cuda else "arch"
        if mode == "none":
            return out | {key: None for key in todo}
        if mode == "all":
            for key, (config, settings) in todo.items():
                out[key] = self._probe(config, num_classes, settings, report)
            return out
        # mode 'arch': one timed probe per arch (settings), the rest scaled by counted FLOPs
        flops = {key: training_flops_per_image(config, num_classes) for key, (config, _) in todo.items()}
        for key, (config, settings) in sorted(todo.items(), key=lambda item: flops[item[0]]):
            reference = next((e for e in self.cache.values() if e["settings"] == settings), None)
            if reference is None:
                out[key] = self._probe(config, num_classes, settings, report)
                continue
            flop_rate = reference["images_per_sec"] * reference["flops_per_image"]
            out[key] = Speed(
                flop_rate / flops[key],
                "probe x FLOPs",
                f"the {reference['method']} probe ({flop_rate / 1e9:.1f} GFLOP/s) / {flops[key] / 1e9:.2f} GFLOP "
                "per training image (counted)",
            )
        return out


def run_seconds(
    run: PlannedRun, speed: Speed | None, train_images: int, test_images: int, *, load_seconds: float = 0.0
) -> float:
    """Estimated seconds to finish ``run`` (0 when finished; NaN without a speed); ``load_seconds``: the data set's
    load time at each start (decoding a JPEG set), beside the fixed start-up."""
    if run.status == "finished":
        return 0.0
    if speed is None:
        return math.nan
    remaining = max(run.config.epochs - run.epochs_done, 0)
    per_epoch = train_images / speed.images_per_sec + test_images / (EVAL_SPEEDUP * speed.images_per_sec)
    return STARTUP_SECONDS + load_seconds + remaining * per_epoch


def format_duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "unknown"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{hours / 24:.1f} days"
