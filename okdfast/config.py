"""The training configuration: defaults are the paper's recipe (docs/METHOD.md section 4); every field is a CLI flag
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
import difflib
import math
import re
import reprlib
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from okdfast.errors import ConfigError
from okdfast.recipe import DERIVED_KEYS, SESSION_FIELDS


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
    cd_weight: float | None = None  # lambda_CD of mde; None: the --cd-form's default (methods/mde.py)
    cd_form: str = "nontarget_corr"  # nontarget_corr | frobenius | abscos | cos2: mde's CD (docs/METHOD.md section 3)
    ffm: str = "on"  # on | off: mde's FFM target (off: the mean of the auxiliary branches, an ablation)
    ffm_input: str = "sum"  # sum | concat | sum+logits | concat+logits | logits: what mde's FFM reads
    ffm_temperature: float = 1.0  # tau of mde's FFM attention softmax
    ffm_targets: str = "shared"  # shared | per-aux: one FFM target for all auxiliaries, or one each
    target_ce: float = 1.0  # weight of CE(target, y) in mde's loss (0 drops the term)
    detach_leader_target: bool = True  # mde: L_kl2 trains the leader only (off: also the auxiliaries, as OKDDip's code)
    label_smoothing: float = 0.0
    fused_loss: str = "auto"  # auto | on | off: fused Triton loss (CUDA) or the PyTorch reference
    # speed (None: the device's default, see resolve_speed_defaults: the fast settings on CUDA, what helps on CPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str | None = None  # off | bf16 | fp16 | auto (bare --amp): bf16 where supported, else fp16 + GradScaler
    channels_last: bool | None = None
    compile: str | None = None  # off | default | max-autotune | reduce-overhead (bare --compile: default)
    cuda_graphs: bool = False  # replay the whole train step as CUDA graphs (static shapes; CUDA only)
    optimizer_impl: str = "auto"  # auto | fused | foreach | for-loop (SGD implementation; auto: fused on CUDA)
    branch_impl: str = "auto"  # auto | loop | grouped: the K branches one after another or as one network
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
        """The epoch boundaries after which lr is multiplied by ``lr_gamma``: epoch m means from epoch m on (0-based),
        so every milestone lies in 1..epochs-1 and at most one decay happens per boundary.

        A fraction f < 1 of the epochs becomes ceil(f * epochs) (the first boundary at or after that share of the
        run: 150 and 225 of 300 for the defaults); a value >= 1 is an epoch. Milestones at or after the last epoch
        would never apply, and one that falls on the boundary of an earlier one would multiply lr twice at once:
        both are left out, and :meth:`milestone_notes` says so in the log.
        """
        resolved: list[int] = []
        for m in self.milestones:
            epoch = max(1, math.ceil(m * self.epochs - 1e-9)) if m < 1 else int(m)
            if epoch < self.epochs and epoch not in resolved:
                resolved.append(epoch)
        return resolved

    def milestone_notes(self) -> list[str]:
        """Log lines for the milestones :meth:`resolved_milestones` leaves out (none with the step schedule's
        defaults and epochs >= 4)."""
        if self.lr_schedule != "step":
            return []
        resolved = self.resolved_milestones()
        if len(resolved) == len(self.milestones):
            return []
        given = " ".join(f"{m:g}" for m in self.milestones)
        kept = f"lr decays after epoch(s) {', '.join(map(str, resolved))} only" if resolved else "lr never decays"
        return [
            f"--milestones {given} with --epochs {self.epochs}: {kept} (a milestone at or after the last epoch never "
            "applies, and two on one epoch boundary would decay twice at once)"
        ]

    def resolved_rampup(self) -> float:
        return self.rampup_epochs if self.rampup_epochs is not None else 80.0 * self.epochs / 300.0

    def validate(self) -> None:
        """Type and range of every value (a :class:`~okdfast.errors.ConfigError` naming the flag and the fix)."""

        def bad(name: str, value: Any, fix: str) -> None:
            error = ConfigError(f"{_flag(name)} {_show(value)}: {fix}")
            error.field = name  # type: ignore[attr-defined]
            raise error

        for f in dataclasses.fields(self):
            problem = _type_problem(getattr(self, f.name), str(f.type))
            if problem:
                bad(f.name, getattr(self, f.name), problem)

        def at_least(name: str, low: float, why: str = "") -> None:
            value = getattr(self, name)
            if value is not None and value < low:
                bad(name, value, f"must be >= {low:g}{why}")

        at_least("epochs", 1)
        at_least("batch_size", 2, " (BatchNorm trains on batch statistics: a batch needs two images or more)")
        at_least("eval_batch_size", 1)
        at_least("subset", 5, " (N training and N/5 test images)")
        at_least("data_seed", 0)
        at_least("seed", 0)
        for name in ("seed", "data_seed"):  # torch, numpy and the loaders' generators take 64-bit seeds
            if getattr(self, name) >= 2**63:
                bad(name, getattr(self, name), "must be below 2^63 (9223372036854775808): seeds are 64-bit integers")
        at_least("workers", 0)
        at_least("nan_check_every", 1)
        at_least("max_steps", 1)
        at_least("log_every", 0, " (0 turns the progress lines off)")
        at_least("weight_decay", 0)
        at_least("alpha", 0, " (0 turns the KD terms off)")
        at_least("rampup_epochs", 0)
        at_least("target_ce", 0, " (0 drops CE(target, y))")
        at_least("cd_weight", 0, " (0 turns the CD loss off)")
        if self.branches is not None and not 1 <= self.branches <= 8:
            bad("branches", self.branches, "K must be between 2 and 8 (1 only for --method baseline)")
        for name in ("lr", "lr_gamma"):
            if not getattr(self, name) > 0:
                bad(name, getattr(self, name), "must be > 0")
        from okdfast.ops.online_kd_options import temperature_problem

        for name in ("temperature", "ffm_temperature"):
            problem = temperature_problem(getattr(self, name))
            if problem:
                bad(name, getattr(self, name), problem)
        if not 0 <= self.momentum < 1:
            bad("momentum", self.momentum, "must be in [0, 1)")
        if not 0 <= self.label_smoothing <= 1:
            bad("label_smoothing", self.label_smoothing, "must be in [0, 1], as in F.cross_entropy")
        for m in self.milestones:
            if m <= 0 or (m >= 1 and not float(m).is_integer()):
                bad("milestones", self.milestones, "each is a fraction of --epochs in (0, 1) or an epoch number >= 1")
        if list(self.milestones) != sorted(set(self.milestones)):
            bad("milestones", self.milestones, "must increase (each one multiplies lr by --lr-gamma once)")
        from okdfast.methods.base import FFM_TARGETS
        from okdfast.models.ffm import FFM_INPUTS

        choices = {
            "amp": (None, "off", "bf16", "fp16", "auto"),
            "compile": (None, "off", "default", "max-autotune", "reduce-overhead"),
            "optimizer_impl": ("auto", "fused", "foreach", "for-loop"),
            "branch_impl": ("auto", "loop", "grouped"),
            "fused_loss": ("auto", "on", "off"),
            "ffm": ("on", "off"),
            "ffm_input": FFM_INPUTS,
            "ffm_targets": FFM_TARGETS,
            "lr_schedule": ("step", "cosine"),
            "progress": ("auto", "on", "off"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                bad(name, getattr(self, name), "use " + ", ".join(a for a in allowed if a is not None))
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            bad("device", self.device, "use auto, cpu, cuda or cuda:N")
        if self.resume is not None and not self.resume.strip():
            bad("resume", self.resume, "use auto (the run folder's last.pt) or the path of a checkpoint")
        for name in ("out", "data_dir"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                default = "runs/<method>_<arch>_<dataset>_k<K>_s<seed>" if name == "out" else "$OKDFAST_DATA, ./data"
                bad(name, getattr(self, name), f"an empty path: name a folder, or leave the flag out for the "
                    f"default ({default})")  # fmt: skip
        if self.out is not None and Path(self.out).exists() and not Path(self.out).is_dir():
            bad("out", self.out, "is a file; --out names the run folder (a new or an existing run's folder)")
        if not self.best_metric.startswith("acc_"):
            bad("best_metric", self.best_metric, "best.pt keeps the epoch of the highest test accuracy: use "
                "acc_branch_mean (default), acc_ensemble or another acc_* metric of the method")  # fmt: skip
        from okdfast.methods.base import CD_FORMS

        if self.cd_form not in CD_FORMS:
            bad("cd_form", self.cd_form, f"use {', '.join(CD_FORMS)}")
        if self.tensorboard:
            from okdfast.utils.tensorboard import INSTALL_HINT, tensorboard_available

            if not tensorboard_available():
                raise ConfigError(INSTALL_HINT)
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
        torch.compile are on unless turned off. On the CPU channels-last is on (it measured faster there), AMP and
        compile are off: bf16 autocast changes the numerics of the fp32 runs CPU users and tests compare against and
        is emulated on CPUs without native bf16 (``--amp`` turns it on); compile costs about a minute per run start,
        more than short CPU runs gain (``--compile``). The measurements: benchmarks/results/train.csv
        (benchmarks/bench_train.py).
        ``--branch-impl auto`` becomes loop or grouped for the device type and arch (okdfast.models.grouped)."""
        from okdfast.models.grouped import resolve_branch_impl

        on_cuda = device_type == "cuda"
        return dataclasses.replace(
            self,
            amp=self.amp if self.amp is not None else ("auto" if on_cuda else "off"),
            channels_last=self.channels_last if self.channels_last is not None else True,
            compile=self.compile if self.compile is not None else ("default" if on_cuda else "off"),
            branch_impl=resolve_branch_impl(self.branch_impl, self.arch, device_type),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> TrainConfig:
        """The config a run stored (its config.yaml, or a checkpoint's), checked like any other: ``where`` names the
        file in messages. Derived keys config.yaml also holds (``num_classes``, ``data_source``, ...) are skipped."""
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: the stored config is a {type(values).__name__}, not a mapping of config keys")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - STORED_EXTRA_KEYS)
        if unknown:
            raise ConfigError(
                f"{where}: the stored config has keys this okdfast does not know ({', '.join(unknown)}): it was "
                "written by another okdfast version; use that version, or start a new run"
            )
        config = cls(**{k: v for k, v in values.items() if k in known})
        try:
            config.validate()
        except ConfigError as error:
            raise ConfigError(f"{where}: the stored config is not valid here: {error}") from None
        return config


STORED_EXTRA_KEYS = DERIVED_KEYS  # keys config.yaml holds besides the fields (okdfast.recipe)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_SHOW_CHARS = 80  # the most of one value a message prints
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 6, 6, 6, 40, 40


def shorten(text: str, limit: int = _SHOW_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out: no message prints a whole value."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def _show(value: Any) -> str:
    """A value as a message shows it: flags' spelling for numbers, words and short lists; bounded for anything."""
    if isinstance(value, list | tuple) and len(value) <= 20 and all(_is_plain(v) for v in value):
        return shorten(" ".join(_show(v) for v in value))
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"(an integer of {value.bit_length()} bits)"
    if isinstance(value, str):
        return shorten(repr(value) if not value or " " in value else value)
    return shorten(str(value)) if _is_plain(value) else _REPR.repr(value)


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _type_problem(value: Any, annotation: str) -> str | None:
    """Why ``value`` does not fit the field annotation ('int', 'float | None', 'list[float]', ...), or None."""
    optional = annotation.endswith(" | None")
    base = annotation.removesuffix(" | None")
    if value is None:
        return None if optional else f"must be set (a {base.replace('list[float]', 'list of numbers')})"
    if base == "bool":
        if not isinstance(value, bool):
            return "must be true or false" + (" (a string is not a boolean)" if isinstance(value, str) else "")
    elif base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            got = f" (got a {type(value).__name__})" if not isinstance(value, str) else _yaml11_number_hint(value, True)
            return "must be an integer" + got
    elif base == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number" + _yaml11_number_hint(value)
        if not math.isfinite(value):
            return "must be a finite number"
    elif base == "str":
        if not isinstance(value, str):
            return f"must be a string (got a {type(value).__name__})"
    elif base == "list[float]":
        if not isinstance(value, list | tuple) or any(
            isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) for v in value
        ):
            return "must be a list of finite numbers"
    return None


_HELP = {
    "method": "the method to train: baseline | independent | dml | one | cl_ilr | okddip | mde (the paper; see "
    "--list-methods and README's table)",
    "arch": "backbone architecture, cut into a shared trunk and K branches (see --list-archs)",
    "branches": "number of branches K, 2..8 (default: the method's: 3; okddip and mde 4 = 3 auxiliaries + leader)",
    "dataset": "cifar10 | cifar100 | cinic10 | synthetic (10 classes, generated in memory, no files) | synthetic100 "
    "(its 100-class variant)",
    "data_dir": "folder holding the data set (default: $OKDFAST_DATA, ./data, ~/.cache/okdfast/data)",
    "download": "download the data set if it is missing (needs internet)",
    "subset": "train on a seeded subset of N images (and test on N/5), N >= 5, for quick runs (default: all)",
    "data_seed": "seed of the synthetic data and of the --subset draw (kept apart from --seed, so seeds compare)",
    "workers": "DataLoader worker processes of the torch loader; threads of DALI / FFCV",
    "loader": "data loader: auto | gpu (data set on the device) | dali | ffcv | torch (DataLoader, the reference); "
    "auto: gpu on CUDA when the data fits, else dali if installed, else torch; torch on the CPU",
    "epochs": "number of epochs (the lr milestones and the KD ramp-up scale with it; 300 in the paper)",
    "batch_size": "global batch size, >= 2 per process (split evenly over torchrun processes)",
    "eval_batch_size": "batch size of the test-set evaluation (no effect on the result)",
    "lr": "initial learning rate of SGD (0.1 for batch 128 in the paper)",
    "momentum": "SGD momentum, in [0, 1)",
    "nesterov": "Nesterov momentum (--no-nesterov for plain momentum)",
    "weight_decay": "L2 weight decay of SGD, on every parameter as in the OKDDip code",
    "milestones": "epochs where lr is multiplied by --lr-gamma; values < 1 are fractions of --epochs (0.5 0.75: "
    "epochs 150 and 225 of 300); milestones at or after the last epoch are left out (logged)",
    "lr_gamma": "factor lr is multiplied by at each milestone",
    "lr_schedule": "step: multiply lr by --lr-gamma at --milestones (the paper); cosine: anneal to 0 over --epochs",
    "temperature": "temperature T of the distillation softmax, > 0",
    "alpha": "weight of the KD terms after the ramp-up (0 turns distillation off)",
    "rampup_epochs": "length L of the KD ramp-up w(e); default 80 per 300 epochs",
    "detach_teacher": "stop the gradient into KD targets (default: each method's reference-code choice)",
    "cd_weight": "lambda_CD, the weight of mde's CD loss (default: the --cd-form's, okdfast/methods/mde.py; 0 turns "
    "it off)",
    "cd_form": "mde's Classifier Diversification loss over pairs of auxiliary branches: nontarget_corr (per sample: "
    "the correlation of their tempered non-target probabilities) | frobenius (sum ||W_i^T W_j||_F of the classifier "
    "weights) | abscos (mean |cos|) | cos2 (mean cos^2); docs/METHOD.md section 3",
    "ffm_input": "what mde's FFM reads: sum | concat of the auxiliaries' pooled features, +logits (their logits, "
    "detached), or logits alone",
    "ffm_temperature": "temperature tau of mde's FFM attention softmax (a = softmax(e / tau))",
    "ffm_targets": "mde's FFM targets: shared (one target for every auxiliary) | per-aux (one each, (B, K-1, K-1))",
    "ffm": "mde's Feature Fusion Module: on (attention target) | off (target = mean of the auxiliary branches)",
    "target_ce": "weight of CE(target, y), the FFM target's own cross-entropy in mde's loss",
    "detach_leader_target": "mde: detach the auxiliaries' mean that distils into the leader, so L_kl2 trains the "
    "leader only (our reading); --no-detach-leader-target lets it train the auxiliaries too, as OKDDip's code does",
    "label_smoothing": "label smoothing eps of every cross-entropy, in [0, 1]",
    "fused_loss": "the online-KD loss: auto (the fused Triton op where it runs: CUDA) | on (the op; an error where "
    "it cannot run) | off (the reference in plain PyTorch)",
    "device": "auto (CUDA when available, else the CPU) | cpu | cuda | cuda:N",
    "amp": "mixed precision: off | bf16 | fp16 | auto (bare --amp = auto); default: auto on CUDA, off on CPU "
    "(auto on a CPU without native bf16 runs fp32: bf16 is several times slower there)",
    "channels_last": "channels-last memory format (default: on; --no-channels-last for NCHW)",
    "compile": "torch.compile mode: off | default | max-autotune | reduce-overhead (bare --compile = default); "
    "default: default on CUDA, off on CPU",
    "cuda_graphs": "replay the whole train step as CUDA graphs (static shapes; the last partial batch runs eagerly)",
    "optimizer_impl": "SGD implementation: auto (fused on CUDA, foreach on CPU) | fused | foreach | for-loop",
    "branch_impl": "how the K branches run: loop (one after another) | grouped (as one network: grouped convs, one "
    "BN and one batched classifier over the K branches; same results) | auto (per device and arch, what "
    "benchmarks/bench_branches.py measured faster; okdfast/models/grouped.py)",
    "sync_bn": "BatchNorm statistics over the global batch under torchrun (default: on when distributed)",
    "nan_check_every": "optimizer steps between host-side checks of the non-finite-loss guard (each check syncs)",
    "seed": "seed of the initial weights, the shuffle and the augmentation (the data draw has --data-seed)",
    "deterministic": "bit-reproducible kernels (slower); needed for exact resume equality on GPU",
    "out": "run folder (default: runs/<method>_<arch>_<dataset>_k<K>_s<seed>); created when training starts",
    "resume": "continue the run in --out: 'auto' (its last.pt, or a fresh start if it has none) or the PATH of a "
    "checkpoint; the run's own config is used, and flags that contradict it are refused (speed and path flags "
    "may change; they are recorded in sessions.jsonl); default: a run folder that holds a run is refused",
    "best_metric": "the test accuracy whose highest epoch is kept as best.pt (acc_branch_mean, acc_ensemble, or the "
    "method's acc_<head>)",
    "max_steps": "stop after this many optimizer steps in total (smoke tests, benchmarks; default: no limit); "
    "--resume auto continues",
    "progress": "auto | on | off: a progress bar on a terminal (auto), a line every --log-every seconds elsewhere",
    "log_every": "seconds between progress lines (step, loss, lr, images/s) when no bar is shown; 0: none",
    "tensorboard": "also write TensorBoard scalars (every metric, loss term, lr, images/s) to RUN_DIR/tensorboard",
}


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" only where the help text does not already say what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


# --help shows the flags in these groups, in this order (a field in none of them lands in "other").
HELP_GROUPS = {
    "model": ("arch", "branches"),
    "data": ("dataset", "data_dir", "download", "subset", "data_seed"),
    "method": ("method", "temperature", "alpha", "rampup_epochs", "detach_teacher", "cd_weight", "cd_form", "ffm",
               "ffm_input", "ffm_temperature", "ffm_targets", "target_ce", "detach_leader_target", "label_smoothing"),
    "optimisation": ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "milestones", "lr_gamma",
                     "lr_schedule", "seed"),
    "speed": ("device", "amp", "channels_last", "compile", "cuda_graphs", "fused_loss", "optimizer_impl",
              "branch_impl", "sync_bn", "loader", "workers", "eval_batch_size", "deterministic", "nan_check_every"),
    "run folder": ("out", "resume", "best_metric", "max_steps"),
    "logging": ("progress", "log_every", "tensorboard"),
}  # fmt: skip


def program_name() -> str:
    """How the user started the CLI: ``okdfast-train`` (the console script) or ``python -m okdfast.train``."""
    script = Path(sys.argv[0] if sys.argv else "").name == "okdfast-train"
    return "okdfast-train" if script else "python -m okdfast.train"


class OneLineParser(argparse.ArgumentParser):
    """A usage error is the message and a pointer to --help, not the 40-line usage of every flag; an unknown flag
    gets the nearest known one."""

    def error(self, message: str) -> None:  # type: ignore[override]
        found = re.match(r"unrecognized arguments: (.*)", message)
        if found:
            flags = [o for a in self._actions for o in a.option_strings]
            near = {w: difflib.get_close_matches(w.split("=")[0], flags, n=1) for w in found.group(1).split()}
            hints = [f"{word.split('=')[0]}: did you mean {match[0]}?" for word, match in near.items() if match]
            message += f" ({'; '.join(hints)})" if hints else ""
        self.exit(2, f"{self.prog}: error: {shorten(message, 600)}\n(all flags: {self.prog} --help)\n")


def build_parser(*, explicit_only: bool = False) -> argparse.ArgumentParser:
    """The CLI. ``explicit_only``: no defaults at all, so the parsed namespace holds only the flags given."""
    parser = OneLineParser(
        prog=program_name(),
        usage="%(prog)s [--config FILE] [--FLAG VALUE ...]  (the flags by group below)",
        description="Train a multi-branch network with online knowledge distillation (MDE, ACCV 2020, and baselines).",
        formatter_class=_DefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS if explicit_only else None,
    )
    parser.add_argument(
        "--config", help="YAML file of config values, keys as the flags' names (flags override it; a run's own "
        "config.yaml starts a new run with its recipe; default: none)"
    )  # fmt: skip
    parser.add_argument("--list-archs", action="store_true", help="print the registered architectures and exit")
    parser.add_argument("--list-methods", action="store_true", help="print the registered methods and exit")
    groups = {title: parser.add_argument_group(title) for title in [*HELP_GROUPS, "other"]}
    group_of = {name: groups[title] for title, names in HELP_GROUPS.items() for name in names}
    for f in dataclasses.fields(TrainConfig):
        group = group_of.get(f.name, groups["other"])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        options: dict[str, Any] = {"help": _HELP.get(f.name, f.name.replace("_", " "))}
        if not explicit_only:
            options["default"] = None if f.type == "bool | None" else default
        if f.name in ("amp", "compile"):
            const = "auto" if f.name == "amp" else "default"
            group.add_argument(_flag(f.name), nargs="?", const=const, **options)
        elif f.type in ("bool", "bool | None"):
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **options)
        elif f.name == "milestones":
            group.add_argument(_flag(f.name), type=float, nargs="+", **options)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            group.add_argument(_flag(f.name), type=kind, **options)
    return parser


# YAML 1.1 (PyYAML) reads unquoted on/off/yes/no as booleans; for the fields whose values are words like 'on' and
# 'off' (--ffm off, --amp off, --progress off) a boolean there means that word.
_WORD_FOR_BOOL = {True: "on", False: "off"}

# What a YAML file okdfast reads may hold. A config is two levels deep and the tables file about seven, so these
# bounds only stop files built to exhaust the reader (a "billion laughs" of nested aliases, lists nested 5,000 deep).
YAML_MAX_BYTES = 4 << 20
YAML_MAX_DEPTH = 32  # nesting levels
YAML_MAX_NODES = 100_000  # values, every alias expanded
_NUMBERS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


class _YamlRefused(Exception):
    def __init__(self, problem: str, mark: Any = None) -> None:
        super().__init__(problem)
        self.problem, self.mark = problem, mark


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python tags) that refuses nesting deeper than YAML_MAX_DEPTH and duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > YAML_MAX_DEPTH:
                raise _YamlRefused(f"nested deeper than {YAML_MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[str, Any] = {}
        for key, _ in node.value if isinstance(node, yaml.MappingNode) else []:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    lines = f"lines {seen[key.value].line + 1} and {key.start_mark.line + 1}"
                    raise _YamlRefused(f"key {shorten(key.value)!r} appears twice ({lines}): keep one", key.start_mark)
                seen[key.value] = key.start_mark
        return super().construct_mapping(node, deep=deep)


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.ScalarNode):
        return []
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return list(node.value)


def _check_expansion(root: Any) -> None:
    """Refuse a node graph whose aliases expand to more than YAML_MAX_NODES values, or that contains itself.
    Iterative: a chain of aliases can be deeper than Python's recursion limit."""
    size: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            open_nodes.discard(id(node))
            size[id(node)] = 1 + sum(size[id(child)] for child in _children(node))
            if size[id(node)] > YAML_MAX_NODES:
                raise _YamlRefused(f"its aliases expand to more than {YAML_MAX_NODES:,} values (a file built to "
                                   "exhaust the reader?); write the values out instead", node.start_mark)  # fmt: skip
        elif id(node) in open_nodes:
            raise _YamlRefused("an alias refers to the value that holds it (an endless value)", node.start_mark)
        elif id(node) not in size:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))


# Plain (unquoted) scalars that YAML 1.1, which PyYAML reads, and YAML 1.2 read differently: (pattern, the tags
# PyYAML gives them, the message, how to write the value so that both read the number meant).
_YAML11_SURPRISES = [
    (r"[-+]?0[0-7_]+", _NUMBERS[:1],
     "YAML 1.1 reads a number with a leading 0 as octal ({v} is {read}): write {fix} (or quote it for a string)"),
    (r"[-+]?\d[\d_]*(:[0-5]?\d)+(\.\d*)?", _NUMBERS,
     "YAML 1.1 reads {v} as the base-60 number {read}: write {read}, or quote it for a string"),
    (r"[-+]?[\d.]*_[\d_.]*([eE][-+]?\d+)?", _NUMBERS,
     "YAML 1.1 reads {v} as {read} and YAML 1.2 as a string: write {fix}"),
]  # fmt: skip


# A number with an exponent and no dot (1e-3): YAML 1.2 reads a number, YAML 1.1 (PyYAML) a string. Said where a
# number field gets that string (_type_problem), so that a string field may hold it.
_EXPONENT_NO_DOT = re.compile(r"[-+]?\d+[eE][-+]?\d+")


def _yaml11_number_hint(value: Any, integer: bool = False) -> str:
    if not isinstance(value, str) or not _EXPONENT_NO_DOT.fullmatch(value.strip()):
        return ""
    mantissa, e, exponent = re.split("([eE])", value.strip())
    number = float(value)
    fix = f"{int(number)}" if integer and number.is_integer() else f"{mantissa}.0{e}{exponent}"
    return f" (YAML 1.1 reads {value} as a string, not a number: write {fix})"


def _yaml11_fix(value: str) -> str:
    sign = value[0] if value[0] in "+-" else ""
    return sign + (value.lstrip("+-").replace("_", "").lstrip("0") or "0")


def _check_yaml11(root: Any, loader: yaml.SafeLoader) -> None:
    """Refuse the plain scalars of _YAML11_SURPRISES (``lr: 1e-3`` is a string in YAML 1.1, ``epochs: 010`` is 8)."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(_children(node))
        if not isinstance(node, yaml.ScalarNode) or node.style is not None:  # quoted: the string it says
            continue
        for pattern, tags, message in _YAML11_SURPRISES:
            if node.tag in tags and re.fullmatch(pattern, node.value):
                read = loader.construct_object(node)
                problem = message.format(v=node.value, read=read, fix=_yaml11_fix(node.value))
                raise _YamlRefused(problem, node.start_mark)


def _at(mark: Any) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _yaml_text(data: bytes, where: str) -> str:
    """The text of a YAML file: UTF-8 only (a BOM is dropped), so a file is read the same everywhere."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        what = "UTF-16 text" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else "not text (it holds NUL bytes)"
        raise ConfigError(f"{where}: is {what}; okdfast reads YAML files as UTF-8: save it as UTF-8")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        byte = f"byte 0x{data[error.start]:02x} at offset {error.start}"
        raise ConfigError(f"{where}: is not UTF-8 text ({byte}: Latin-1, or not text?); save it as UTF-8") from None


def read_yaml(path: str | Path, where: str, *, strict_numbers: bool = False) -> Any:
    """The value of a YAML file okdfast reads (a --config, a run's config.yaml, a tables file), or a ConfigError
    naming ``where``: UTF-8 text, PyYAML's safe loader (no Python tags), nesting, size and alias expansion bounded,
    no duplicate keys, and with ``strict_numbers`` no plain scalar that YAML 1.1 and 1.2 read differently."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(YAML_MAX_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{where}: cannot be read ({error.strerror or error})") from None
    if len(data) > YAML_MAX_BYTES:
        raise ConfigError(f"{where}: is larger than {YAML_MAX_BYTES >> 20} MiB, which no okdfast YAML file is")
    loader = _BoundedLoader(_yaml_text(data, where))
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        if strict_numbers:
            _check_yaml11(node, loader)
        return loader.construct_document(node)
    except _YamlRefused as refused:
        raise ConfigError(f"{where}{_at(refused.mark)}: {refused.problem}") from None
    except yaml.YAMLError as error:
        problem = shorten(str(getattr(error, "problem", None) or error))
        tag = re.search(r"tag:yaml\.org,2002:(python/[^'\s]*)", str(error))
        if tag:
            problem = f"!!{shorten(tag.group(1), 60)} is refused: okdfast reads plain values, never Python objects"
        mark = getattr(error, "problem_mark", None)
        raise ConfigError(f"{where}: not valid YAML{_at(mark)}: {problem}") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{where}: a value cannot be read ({shorten(str(error), 120)})") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The config values of a YAML file, keys as field names (``batch-size`` and ``batch_size`` alike, but not
    both). A run's own config.yaml is a config too: its derived keys (okdfast.recipe.DERIVED_KEYS) and its session
    fields (where it wrote, how far it went) are left out. Types and ranges are checked by
    :meth:`TrainConfig.validate`."""
    where = f"--config {path}"
    values = read_yaml(path, where, strict_numbers=True)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {type(values).__name__}")
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    own_run = any(key in DERIVED_KEYS for key in values)  # a run folder's config.yaml
    spelled: dict[str, str] = {}
    config: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: the key {_show(key)} is not a name; keys are the flags' names")
        name = key.replace("-", "_")
        if name in spelled:
            raise ConfigError(f"{where}: sets {name} twice (as {spelled[name]} and {shorten(key)}): keep one")
        spelled[name] = key
        if not (own_run and (name in DERIVED_KEYS or name in SESSION_FIELDS)):
            config[name] = value
    unknown = [name for name in config if name not in types]
    if unknown:
        listed = [shorten(name, 40) for name in unknown[:5]] + ([f"and {len(unknown) - 5} more"] if unknown[5:] else [])
        near = [f"{shorten(n, 40)}: did you mean {m[0]}?" for n in unknown[:5] if (m := _nearest(n, types))]
        raise ConfigError(f"{where}: unknown keys {listed}{' (' + '; '.join(near) + ')' if near else ''}; the keys "
                          "are the flags' names (--help lists them)")  # fmt: skip
    for name, value in config.items():
        if isinstance(value, bool) and types[name].removesuffix(" | None") == "str":
            config[name] = _WORD_FOR_BOOL[value]
    return config


def _nearest(name: str, known: Iterable[str]) -> list[str]:
    return difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)


# Fields only some methods read: for any other method the flag does nothing, and parse_config says so.
KD_FIELDS = ("temperature", "alpha", "rampup_epochs", "detach_teacher")  # read by every method that distils
NO_KD_METHODS = ("baseline", "independent")  # cross-entropy only
MDE_FIELDS = ("cd_weight", "cd_form", "ffm", "ffm_input", "ffm_temperature", "ffm_targets", "target_ce",
              "detach_leader_target")  # fmt: skip


def ignored_flags(config: TrainConfig, given: Iterable[str]) -> str | None:
    """One line naming the ``given`` fields that do nothing for ``config.method`` (None when every one acts)."""
    given = set(given)
    mde_only = [n for n in MDE_FIELDS if n in given and config.method != "mde"]
    kd_only = [n for n in KD_FIELDS if n in given and config.method in NO_KD_METHODS]
    if not mde_only and not kd_only:
        return None
    mde_named = ", ".join(map(_flag, mde_only)) if kd_only else ("it" if len(mde_only) == 1 else "them")
    why = ([f"only mde reads {mde_named}"] if mde_only else []) + (
        [f"{config.method} trains with cross-entropy only, no distillation"] if kd_only else []
    )
    flags = ", ".join(map(_flag, mde_only + kd_only))
    one = len(mde_only + kd_only) == 1
    return f"{flags} {'does' if one else 'do'} nothing for --method {config.method} ({'; '.join(why)}): drop " + (
        "it" if one else "them"
    )


def parse_config(
    argv: list[str] | None = None, *, note: Callable[[str], None] | None = None
) -> tuple[TrainConfig, argparse.Namespace]:
    """Command line (and optional YAML) -> validated TrainConfig, plus the raw namespace for the --list flags.

    The namespace's ``explicit`` is the set of fields the command line or the YAML file set (a resumed run compares
    those with its stored config). ``note`` gets the one-line warning about flags that do nothing for the method
    (default: printed to stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # --help, unknown flags and unparsable values exit here with status 2
    given = vars(build_parser(explicit_only=True).parse_args(argv))
    given = {k: v for k, v in given.items() if k not in ("config", "list_archs", "list_methods")}
    from_yaml: dict[str, Any] = {}
    if args.config:
        try:
            from_yaml = load_yaml(args.config)
        except ConfigError as error:
            parser.error(str(error))
    defaults = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in given}
    config = TrainConfig(**(defaults | from_yaml | given))
    try:
        config.validate()
    except ConfigError as error:
        name = getattr(error, "field", None)
        source = f" (set in {args.config})" if name in from_yaml and name not in given else ""
        parser.error(f"{error}{source}")  # exits with status 2 and the usage line, not a traceback
    args.explicit = set(from_yaml) | set(given)
    unused = ignored_flags(config, args.explicit)
    if unused:
        (note or (lambda line: print(f"{parser.prog}: warning: {line}", file=sys.stderr, flush=True)))(unused)
    return config, args
