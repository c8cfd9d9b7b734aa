"""The run's configuration, :class:`TrainConfig`: every field a CLI flag (``--batch-size`` for ``batch_size``) and a
YAML key, declared once with its default, help text and check (``okdfast.utils.params``). Defaults are the paper's
recipe (docs/METHOD.md section 4); the method's hyper-parameters are declared in
:class:`okdfast.methods.base.MethodConfig` and taken from there (:func:`~okdfast.utils.params.same_param`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from okdfast.config.checks import (
    DEVICE,
    KNOWN_ARCH,
    KNOWN_DATASET,
    KNOWN_METHOD,
    MILESTONES,
    NOT_EMPTY_PATH,
    OUT_FOLDER,
    SEED,
    check_together,
    loader_check,
    refuse,
    type_problem,
)
from okdfast.config.recipe import DERIVED_KEYS
from okdfast.data.factory import LOADERS
from okdfast.errors import ConfigError
from okdfast.methods.base import MethodConfig
from okdfast.utils.params import (
    above,
    at_least,
    check_of,
    default_of,
    field_of,
    one_of,
    param,
    param_problems,
    same_param,
)

PAPER_EPOCHS = 300
_METHOD = MethodConfig


@dataclass
class TrainConfig:
    # what is trained
    method: str = param(
        "mde",
        help="the method to train: baseline | independent | dml | one | cl_ilr | okddip | mde (the paper; see "
        "--list-methods and README's table)",
        check=KNOWN_METHOD,
    )
    arch: str = param(
        "resnet32",
        help="backbone architecture, cut into a shared trunk and K branches (see --list-archs)",
        check=KNOWN_ARCH,
    )
    branches: int | None = param(
        None,
        help="number of branches K, 2..8 (default: the method's: 3; okddip and mde 4 = 3 auxiliaries + leader)",
        check=check_of(_METHOD, "num_branches"),
    )
    # data
    dataset: str = param(
        "cifar100",
        help="cifar10 | cifar100 | cinic10 | synthetic (10 classes, generated in memory, no files) | synthetic100 "
        "(its 100-class variant)",
        check=KNOWN_DATASET,
    )
    data_dir: str | None = param(
        None,
        help="folder holding the data set (default: $OKDFAST_DATA, ./data, ~/.cache/okdfast/data)",
        check=NOT_EMPTY_PATH("$OKDFAST_DATA, ./data"),
    )
    download: bool = param(False, help="download the data set if it is missing (needs internet)")
    subset: int | None = param(
        None,
        help="train on a seeded subset of N images (and test on N/5), N >= 5, for quick runs (default: all)",
        check=at_least(5, " (N training and N/5 test images)"),
    )
    data_seed: int = param(
        0,
        help="seed of the synthetic data and of the --subset draw (kept apart from --seed, so seeds compare)",
        check=SEED,
    )
    workers: int = param(
        2, help="DataLoader worker processes of the torch loader; threads of DALI / FFCV", check=at_least(0)
    )
    loader: str = param(
        "auto",
        help="data loader: auto | gpu (data set on the device) | dali | ffcv | torch (DataLoader, the reference); "
        "auto: gpu on CUDA when the data fits, else dali if installed, else torch; torch on the CPU",
        check=loader_check(LOADERS),
    )
    # optimisation (OKDDip code: SGD nesterov, wd 5e-4, lr 0.1, /10 at epochs 150 and 225 of 300, batch 128)
    epochs: int = param(
        PAPER_EPOCHS,
        help="number of epochs (the lr milestones and the KD ramp-up scale with it; 300 in the paper)",
        check=at_least(1),
    )
    batch_size: int = param(
        128,
        help="global batch size, >= 2 per process (split evenly over torchrun processes)",
        check=at_least(2, " (BatchNorm trains on batch statistics: a batch needs two images or more)"),
    )
    eval_batch_size: int = param(
        500, help="batch size of the test-set evaluation (no effect on the result)", check=at_least(1)
    )
    lr: float = param(0.1, help="initial learning rate of SGD (0.1 for batch 128 in the paper)", check=above(0))
    momentum: float = param(
        0.9, help="SGD momentum, in [0, 1)", check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)"
    )
    nesterov: bool = param(True, help="Nesterov momentum (--no-nesterov for plain momentum)")
    weight_decay: float = param(
        5e-4, help="L2 weight decay of SGD, on every parameter as in the OKDDip code", check=at_least(0)
    )
    milestones: list[float] = param(
        help="epochs where lr is multiplied by --lr-gamma; values < 1 are fractions of --epochs (0.5 0.75: "
        "epochs 150 and 225 of 300); milestones at or after the last epoch are left out (logged)",
        check=MILESTONES,
        default_factory=lambda: [0.5, 0.75],
    )
    lr_gamma: float = param(0.1, help="factor lr is multiplied by at each milestone", check=above(0))
    lr_schedule: str = param(
        "step",
        help="step: multiply lr by --lr-gamma at --milestones (the paper); cosine: anneal to 0 over --epochs",
        check=one_of(("step", "cosine")),
    )
    # distillation (the method's hyper-parameters: declared in MethodConfig)
    temperature: float = same_param(_METHOD, "temperature")
    alpha: float = same_param(_METHOD, "alpha")
    rampup_epochs: float | None = param(
        None,
        help="length L of the KD ramp-up w(e); default 80 per 300 epochs",
        check=check_of(_METHOD, "rampup_epochs"),
    )
    detach_teacher: bool | None = same_param(_METHOD, "detach_teacher")
    cd_weight: float | None = same_param(_METHOD, "cd_weight")
    cd_form: str = same_param(_METHOD, "cd_form")
    ffm: str = param(
        "on",
        help="mde's Feature Fusion Module: on (attention target) | off (target = mean of the auxiliary branches)",
        check=one_of(("on", "off")),
    )
    ffm_input: str = same_param(_METHOD, "ffm_input")
    ffm_temperature: float = same_param(_METHOD, "ffm_temperature")
    ffm_targets: str = same_param(_METHOD, "ffm_targets")
    target_ce: float = same_param(_METHOD, "target_ce")
    detach_leader_target: bool = same_param(_METHOD, "detach_leader_target")
    label_smoothing: float = same_param(_METHOD, "label_smoothing")
    fused_loss: str = same_param(_METHOD, "fused_loss")
    # speed (None: the device's default, see resolve_speed_defaults: the fast settings on CUDA, what helps on CPU)
    device: str = param("auto", help="auto (CUDA when available, else the CPU) | cpu | cuda | cuda:N", check=DEVICE)
    amp: str | None = param(
        None,
        help="mixed precision: off | bf16 | fp16 | auto (bare --amp = auto); default: auto on CUDA, off on CPU "
        "(auto on a CPU without native bf16 runs fp32: bf16 is several times slower there)",
        check=one_of((None, "off", "bf16", "fp16", "auto")),
    )
    channels_last: bool | None = param(
        None, help="channels-last memory format (default: on; --no-channels-last for NCHW)"
    )
    compile: str | None = param(
        None,
        help="torch.compile mode: off | default | max-autotune | reduce-overhead (bare --compile = default); "
        "default: default on CUDA, off on CPU",
        check=one_of((None, "off", "default", "max-autotune", "reduce-overhead")),
    )
    cuda_graphs: bool = param(
        False,
        help="replay the whole train step as CUDA graphs (static shapes; the last partial batch runs eagerly)",
    )
    optimizer_impl: str = param(
        "auto",
        help="SGD implementation: auto (fused on CUDA, foreach on CPU) | fused | foreach | for-loop",
        check=one_of(("auto", "fused", "foreach", "for-loop")),
    )
    branch_impl: str = same_param(_METHOD, "branch_impl")
    sync_bn: bool | None = param(
        None, help="BatchNorm statistics over the global batch under torchrun (default: on when distributed)"
    )
    nan_check_every: int = param(
        50,
        help="optimizer steps between host-side checks of the non-finite-loss guard (each check syncs)",
        check=at_least(1),
    )
    # bookkeeping
    seed: int = param(
        0,
        help="seed of the initial weights, the shuffle and the augmentation (the data draw has --data-seed)",
        check=SEED,
    )
    deterministic: bool = param(
        False, help="bit-reproducible kernels (slower); needed for exact resume equality on GPU"
    )
    out: str | None = param(
        None,
        help="run folder (default: runs/<method>_<arch>_<dataset>_k<K>_s<seed>); created when training starts",
        check=OUT_FOLDER,
    )
    resume: str | None = param(
        None,
        help="continue the run in --out: 'auto' (its last.pt, or a fresh start if it has none) or the PATH of a "
        "checkpoint; the run's own config is used, and flags that contradict it are refused (speed and path flags "
        "may change; they are recorded in sessions.jsonl); default: a run folder that holds a run is refused",
        check=lambda v: None if v.strip() else "use auto (the run folder's last.pt) or the path of a checkpoint",
    )
    best_metric: str = param(
        "acc_branch_mean",
        help="the test accuracy whose highest epoch is kept as best.pt (acc_branch_mean, acc_ensemble, or the "
        "method's acc_<head>)",
        check=lambda v: (
            None
            if v.startswith("acc_")
            else "best.pt keeps the epoch of the highest test accuracy: "
            "use acc_branch_mean (default), acc_ensemble or another acc_* metric of the method"
        ),
    )
    max_steps: int | None = param(
        None,
        help="stop after this many optimizer steps in total (smoke tests, benchmarks; default: no limit); "
        "--resume auto continues",
        check=at_least(1),
    )
    progress: str = param(
        "auto",
        help="auto | on | off: a progress bar on a terminal (auto), a line every --log-every seconds elsewhere",
        check=one_of(("auto", "on", "off")),
    )
    log_every: float = param(
        30.0,
        help="seconds between progress lines (step, loss, lr, images/s) when no bar is shown; 0: none",
        check=at_least(0, " (0 turns the progress lines off)"),
    )
    tensorboard: bool = param(
        False,
        help="also write TensorBoard scalars (every metric, loss term, lr, images/s) to RUN_DIR/tensorboard",
    )

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
        """L of w(e): --rampup-epochs, else the method default's share of the paper's epochs, scaled to --epochs."""
        if self.rampup_epochs is not None:
            return self.rampup_epochs
        return default_of(field_of(MethodConfig, "rampup_epochs")) * self.epochs / PAPER_EPOCHS

    def validate(self) -> None:
        """Type and range of every value (a :class:`~okdfast.errors.ConfigError` naming the flag and the fix): each
        field's type, then each field's own check (its declaration), then the checks that read several fields."""
        for f in dataclasses.fields(self):
            problem = type_problem(getattr(self, f.name), str(f.type))
            if problem:
                refuse(f.name, getattr(self, f.name), problem)
        for name, value, problem in param_problems(self):
            refuse(name, value, problem)
        check_together(self)

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


STORED_EXTRA_KEYS = DERIVED_KEYS  # keys config.yaml holds besides the fields (okdfast.config.recipe)
