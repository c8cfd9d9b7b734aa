"""The training configuration: defaults are the paper's recipe (METHOD.md section 4); every field is a CLI flag
(``--batch-size`` for ``batch_size``) and may also come from a YAML file (``--config run.yaml``). Precedence:
command line > YAML > defaults. The resolved config is written to every run folder as ``config.yaml``.

Every value is checked once, for its type and its range, by :meth:`TrainConfig.validate`, whether it came from a
flag, from YAML or from a caller of :func:`okdfast.train.run`: ``epochs: 1.5``, ``nesterov: "no"`` or
``--label-smoothing 2`` are refused with a :class:`~okdfast.errors.ConfigError` naming the value and the fix,
before anything is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from okdfast.errors import ConfigError


@dataclass
class TrainConfig:
    # what is trained
    method: str = "mde"  # baseline | independent | dml | one | cl_ilr | okddip | mde
    arch: str = "resnet32"  # resnet8/20/32/56/110, wrn20_8, vgg16, densenet40_12 (see --list-archs)
    branches: int | None = None  # K; None: the method's default (3; okddip and mde 4 = 3 auxiliaries + leader)
    # data
    dataset: str = "cifar100"  # cifar10 | cifar100 | cinic10 | synthetic
    data_dir: str | None = None  # default: $OKDFAST_DATA, ./data, ~/.cache/okdfast/data
    download: bool = False  # fetch the data set when it is missing (needs internet)
    subset: int | None = None  # N: seeded subset of N training and N/5 test images, for quick runs
    data_seed: int = 0  # fixes the synthetic data and the --subset draw (independent of --seed, so seeds compare)
    workers: int = 2  # DataLoader worker processes (torch loader); DALI / FFCV threads
    loader: str = "auto"  # auto | gpu | dali | ffcv | torch (okdfast.data.factory; auto: gpu if the data fits)
    # optimisation (OKDDip code: SGD nesterov, wd 5e-4, lr 0.1, /10 at epochs 150 and 225 of 300, batch 128)
    epochs: int = 300
    batch_size: int = 128
    eval_batch_size: int = 500
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # <1: fractions of epochs; else epochs
    lr_gamma: float = 0.1
    lr_schedule: str = "step"  # step: x lr_gamma at --milestones (the paper) | cosine: cosine to 0 over --epochs
    # distillation
    temperature: float = 3.0
    alpha: float = 1.0
    rampup_epochs: float | None = None  # L of w(e); None: 80 epochs per 300 (scaled to --epochs)
    detach_teacher: bool | None = None  # None: each method's reference-code default
    cd_weight: float | None = None  # lambda_CD of mde; None: the --cd-form's default (frobenius 5e-8)
    cd_form: str = "frobenius"  # frobenius | abscos | cos2: the CD loss of mde (docs/METHOD.md section 3)
    ffm: str = "on"  # on | off: mde's FFM target (off: the mean of the auxiliary branches, an ablation)
    target_ce: float = 1.0  # weight of CE(target, y) in mde's loss (0 drops the term)
    label_smoothing: float = 0.0
    fused_loss: str = "auto"  # auto | on | off: fused Triton loss (CUDA) or the PyTorch reference
    # speed (None: the device's default, see resolve_speed_defaults: the fast settings on CUDA, what helps on CPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str | None = None  # off | bf16 | fp16 | auto (bare --amp): bf16 where supported, else fp16 + GradScaler
    channels_last: bool | None = None
    compile: str | None = None  # off | default | max-autotune | reduce-overhead (bare --compile: default)
    cuda_graphs: bool = False  # replay the whole train step as CUDA graphs (static shapes; CUDA only)
    optimizer_impl: str = "auto"  # auto | fused | foreach | for-loop (SGD implementation; auto: fused on CUDA)
    sync_bn: bool | None = None  # BatchNorm statistics over the global batch under DDP (None: on when distributed)
    nan_check_every: int = 50  # steps between host-side checks of the non-finite-loss guard
    # bookkeeping
    seed: int = 0
    deterministic: bool = False  # bit-reproducible kernels (slower); needed for exact resume equality on GPU
    out: str | None = None  # run folder; default runs/<method>_<arch>_<dataset>_k<K>_s<seed>
    resume: str | None = None  # PATH to last.pt/best.pt, or 'auto' (the run folder's last.pt if it exists)
    best_metric: str = "acc_branch_mean"  # which test metric picks best.pt
    max_steps: int | None = None  # stop after this many optimizer steps in total (smoke tests, benchmarks)
    progress: str = "auto"  # auto | on | off: the tqdm bar (auto: on a terminal; elsewhere a line every --log-every s)
    log_every: float = 30.0  # seconds between progress lines in the log when no bar is shown (0: none)
    tensorboard: bool = False  # also write TensorBoard scalars to RUN_DIR/tensorboard (needs tensorboard)

    def resolved_milestones(self) -> list[int]:
        return [int(round(m * self.epochs)) if m < 1 else int(m) for m in self.milestones]

    def resolved_rampup(self) -> float:
        return self.rampup_epochs if self.rampup_epochs is not None else 80.0 * self.epochs / 300.0

    def validate(self) -> None:
        def bad(name: str, value: Any, fix: str) -> None:
            raise ValueError(f"--{name.replace('_', '-')} {value}: {fix}")

        if self.epochs < 0:
            bad("epochs", self.epochs, "must be >= 0")
        if self.batch_size < 1:
            bad("batch_size", self.batch_size, "must be >= 1")
        if self.eval_batch_size < 1:
            bad("eval_batch_size", self.eval_batch_size, "must be >= 1")
        if self.branches is not None and not 1 <= self.branches <= 8:
            bad("branches", self.branches, "K must be between 2 and 8 (1 only for --method baseline)")
        if not self.lr > 0:
            bad("lr", self.lr, "must be > 0")
        if not self.temperature > 0:
            bad("temperature", self.temperature, "must be > 0")
        if self.subset is not None and self.subset < 5:
            bad("subset", self.subset, "must be >= 5 (N training and N/5 test images)")
        if self.amp not in (None, "off", "bf16", "fp16", "auto"):
            bad("amp", self.amp, "use off, bf16, fp16 or auto")
        if self.compile not in (None, "off", "default", "max-autotune", "reduce-overhead"):
            bad("compile", self.compile, "use off, default, max-autotune or reduce-overhead")
        if self.optimizer_impl not in ("auto", "fused", "foreach", "for-loop"):
            bad("optimizer_impl", self.optimizer_impl, "use auto, fused, foreach or for-loop")
        if self.nan_check_every < 1:
            bad("nan_check_every", self.nan_check_every, "must be >= 1")
        if self.fused_loss not in ("auto", "on", "off"):
            bad("fused_loss", self.fused_loss, "use auto, on or off")
        from okdfast.ops.classifier_diversity import CD_FORMS

        if self.cd_form not in CD_FORMS:
            bad("cd_form", self.cd_form, f"use {', '.join(CD_FORMS)}")
        if self.cd_weight is not None and not self.cd_weight >= 0:
            bad("cd_weight", self.cd_weight, "must be >= 0 (0 turns the CD loss off)")
        if self.ffm not in ("on", "off"):
            bad("ffm", self.ffm, "use on (the FFM target) or off (the mean of the auxiliary branches)")
        if not self.target_ce >= 0:
            bad("target_ce", self.target_ce, "must be >= 0 (0 drops CE(target, y))")
        if self.tensorboard:
            from okdfast.utils.tensorboard import INSTALL_HINT, tensorboard_available

            if not tensorboard_available():
                raise ValueError(INSTALL_HINT)
        if self.lr_schedule not in ("step", "cosine"):
            bad("lr_schedule", self.lr_schedule, "use step or cosine")
        if self.progress not in ("auto", "on", "off"):
            bad("progress", self.progress, "use auto, on or off")
        if self.workers < 0:
            bad("workers", self.workers, "must be >= 0")
        from okdfast.data.factory import LOADERS, install_hint

        if self.loader not in LOADERS:
            bad("loader", self.loader, f"use {', '.join(LOADERS)}")
        if install_hint(self.loader) is not None:
            bad("loader", self.loader, install_hint(self.loader))
        from okdfast.data import list_datasets
        from okdfast.methods import list_methods
        from okdfast.models import list_models

        if self.method not in list_methods():
            bad("method", self.method, f"unknown method; choose one of {', '.join(list_methods())}")
        if self.arch not in list_models():
            bad("arch", self.arch, f"unknown architecture; choose one of {', '.join(list_models())}")
        from okdfast.methods import method_class

        cls = method_class(self.method)
        branches = self.branches if self.branches is not None else cls.default_branches
        if not cls.min_branches <= branches <= cls.max_branches:
            bad("branches", branches, f"method {self.method} trains {cls.min_branches}..{cls.max_branches} branches")
        if self.dataset not in list_datasets():
            bad("dataset", self.dataset, f"unknown data set; choose one of {', '.join(list_datasets())}")

    def resolve_speed_defaults(self, device_type: str) -> TrainConfig:
        """A copy with every speed setting concrete: on CUDA channels-last, AMP (bf16, else fp16) and
        torch.compile are on unless turned off. On the CPU channels-last is on (1.24-1.27x for resnet32, 1.3x for
        resnet8), AMP and compile are off: bf16 autocast was 1.5-1.7x on this machine's AVX512-BF16 CPU, but it
        changes the numerics of the fp32 runs CPU users and tests compare against and is slow on CPUs without native
        bf16 (``--amp`` turns it on); compile was 1.2x but costs ~1 minute per run start, more than short CPU runs
        gain (``--compile``). Measured with benchmarks/bench_train.py (benchmarks/results/train.csv)."""
        on_cuda = device_type == "cuda"
        return dataclasses.replace(
            self,
            amp=self.amp if self.amp is not None else ("auto" if on_cuda else "off"),
            channels_last=self.channels_last if self.channels_last is not None else True,
            compile=self.compile if self.compile is not None else ("default" if on_cuda else "off"),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_HELP = {
    "loader": "data loader: auto | gpu (data set on the device) | dali | ffcv | torch (DataLoader, the reference); "
    "auto: gpu on CUDA when the data fits, else dali if installed, else torch; torch on the CPU",
    "method": "the method to train",
    "arch": "backbone architecture",
    "branches": "number of branches K (default: the method's)",
    "dataset": "cifar10 | cifar100 | cinic10 | synthetic (offline, generated in memory)",
    "data_dir": "folder holding the data set (default: $OKDFAST_DATA, ./data, ~/.cache/okdfast/data)",
    "download": "download the data set if it is missing (needs internet)",
    "subset": "train on a seeded subset of N images (and test on N/5)",
    "milestones": "epochs where lr is multiplied by --lr-gamma; values < 1 are fractions of --epochs",
    "rampup_epochs": "length L of the KD ramp-up w(e); default 80 per 300 epochs",
    "detach_teacher": "stop the gradient into KD targets (default: each method's reference-code choice)",
    "amp": "mixed precision: off | bf16 | fp16 | auto (bare --amp = auto); default: auto on CUDA, off on CPU",
    "compile": "torch.compile mode: off | default | max-autotune | reduce-overhead (bare --compile = default); "
    "default: default on CUDA, off on CPU",
    "channels_last": "channels-last memory format (default: on; --no-channels-last for NCHW)",
    "cuda_graphs": "replay the whole train step as CUDA graphs (static shapes; the last partial batch runs eagerly)",
    "sync_bn": "BatchNorm statistics over the global batch under torchrun (default: on when distributed)",
    "batch_size": "global batch size (split evenly over torchrun processes)",
    "resume": "checkpoint to resume from, or 'auto' for the run folder's last.pt",
    "max_steps": "stop after this many optimizer steps (for smoke tests and benchmarks)",
    "lr_schedule": "step: multiply lr by --lr-gamma at --milestones (the paper); cosine: anneal to 0 over --epochs",
    "tensorboard": "also write TensorBoard scalars (every metric, loss term, lr, images/s) to RUN_DIR/tensorboard",
    "fused_loss": "the online-KD / CD losses: auto (fused Triton op on CUDA) | on (the op, also on CPU) | off "
    "(the reference in plain PyTorch)",
    "optimizer_impl": "SGD implementation: auto (fused on CUDA, foreach on CPU) | fused | foreach | for-loop",
    "nan_check_every": "optimizer steps between host-side checks of the non-finite-loss guard (each check syncs)",
    "cd_weight": "lambda_CD, the weight of mde's CD loss (default: the --cd-form's, frobenius 5e-8; 0 turns it off)",
    "cd_form": "mde's Classifier Diversification loss over pairs of auxiliary classifiers: frobenius "
    "(sum ||W_i^T W_j||_F) | abscos (mean |cos|) | cos2 (mean cos^2); docs/METHOD.md section 3",
    "ffm": "mde's Feature Fusion Module: on (attention target) | off (target = mean of the auxiliary branches)",
    "target_ce": "weight of CE(target, y), the FFM target's own cross-entropy in mde's loss",
}


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" only where the help text does not already say what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m okdfast.train",
        description="Train a multi-branch network with online knowledge distillation (MDE, ACCV 2020, and baselines).",
        formatter_class=_DefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file of config values (flags override it)")
    parser.add_argument("--list-archs", action="store_true", help="print the registered architectures and exit")
    parser.add_argument("--list-methods", action="store_true", help="print the registered methods and exit")
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = _HELP.get(f.name, f.name.replace("_", " "))
        if f.name in ("amp", "compile"):
            const = "auto" if f.name == "amp" else "default"
            parser.add_argument(_flag(f.name), nargs="?", const=const, default=default, help=help_text)
        elif f.type in ("bool",):
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif f.type == "bool | None":
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "milestones":
            parser.add_argument(_flag(f.name), type=float, nargs="+", default=default, help=help_text)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            parser.add_argument(_flag(f.name), type=kind, default=default, help=help_text)
    return parser


def load_yaml(path: str | Path) -> dict[str, Any]:
    with open(path) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of config keys, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {unknown}; known keys: {sorted(known)}")
    return values


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Command line (and optional YAML) -> validated TrainConfig, plus the raw namespace for the --list flags."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        try:
            parser.set_defaults(**load_yaml(pre.config))
        except (OSError, ValueError) as error:
            parser.error(str(error))
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**values)
    try:
        config.validate()
    except ValueError as error:
        parser.error(str(error))  # exits with status 2 and the usage line, not a traceback
    return config, args
