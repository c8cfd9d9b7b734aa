"""The checks of the run's config: each field's type (from its annotation), the checks its declaration names
(``okdfast.config.train_config``), and the checks that read several fields at once. A refusal is a
:class:`~okdfast.errors.ConfigError` ``--flag value: the fix`` with the field's name attached (so that
``parse_config`` can say when the value came from a YAML file).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from okdfast.config.messages import flag_name, show_value
from okdfast.config.yaml_reader import yaml11_number_hint
from okdfast.data.factory import install_hint
from okdfast.errors import ConfigError
from okdfast.utils.params import all_of, one_of


def refuse(name: str, value: Any, fix: str) -> None:
    error = ConfigError(f"{flag_name(name)} {show_value(value)}: {fix}")
    error.field = name  # type: ignore[attr-defined]
    raise error


def type_problem(value: Any, annotation: str) -> str | None:
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
            got = f" (got a {type(value).__name__})" if not isinstance(value, str) else yaml11_number_hint(value, True)
            return "must be an integer" + got
    elif base == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number" + yaml11_number_hint(value)
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


def _seed(value: int) -> str | None:
    if value < 0:
        return "must be >= 0"
    if value >= 2**63:  # torch, numpy and the loaders' generators take 64-bit seeds
        return "must be below 2^63 (9223372036854775808): seeds are 64-bit integers"
    return None


def _milestones(values: list[float]) -> str | None:
    for m in values:
        if m <= 0 or (m >= 1 and not float(m).is_integer()):
            return "each is a fraction of --epochs in (0, 1) or an epoch number >= 1"
    if list(values) != sorted(set(values)):
        return "must increase (each one multiplies lr by --lr-gamma once)"
    return None


def _not_empty_path(default: str):  # noqa: ANN202
    def check(value: str) -> str | None:
        if value.strip():
            return None
        return f"an empty path: name a folder, or leave the flag out for the default ({default})"

    return check


def _not_a_file(value: str) -> str | None:
    if Path(value).exists() and not Path(value).is_dir():
        return "is a file; --out names the run folder (a new or an existing run's folder)"
    return None


def _installed_loader(value: str) -> str | None:
    return install_hint(value)


def _known(kind: str, names) -> Any:  # noqa: ANN001
    """A check that the value is one of a registry's names (read when checked: registries fill as modules load)."""

    def check(value: str) -> str | None:
        known = names()
        return None if value in known else f"unknown {kind}; choose one of {', '.join(known)}"

    return check


def _method_names() -> list[str]:
    from okdfast.methods import list_methods

    return list_methods()


def _model_names() -> list[str]:
    from okdfast.models import list_models

    return list_models()


def _dataset_names() -> list[str]:
    from okdfast.data import list_datasets

    return list_datasets()


SEED = _seed
MILESTONES = _milestones
NOT_EMPTY_PATH = _not_empty_path
OUT_FOLDER = all_of(_not_empty_path("runs/<method>_<arch>_<dataset>_k<K>_s<seed>"), _not_a_file)
DEVICE = lambda value: None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) else "use auto, cpu, cuda or cuda:N"  # noqa: E731
KNOWN_METHOD = _known("method", _method_names)
KNOWN_ARCH = _known("architecture", _model_names)
KNOWN_DATASET = _known("data set", _dataset_names)


def loader_check(loaders: tuple[str, ...]) -> Any:
    return all_of(one_of(loaders), _installed_loader)


def check_together(config: Any) -> None:  # a TrainConfig
    """The checks that read more than one field, or the machine: the method's range of K, TensorBoard installed."""
    from okdfast.methods import method_class

    cls = method_class(config.method)
    branches = config.branches if config.branches is not None else cls.default_branches
    if not cls.min_branches <= branches <= cls.max_branches:
        refuse("branches", branches, f"method {config.method} trains {cls.min_branches}..{cls.max_branches} branches")
    if config.tensorboard:
        from okdfast.utils.tensorboard import INSTALL_HINT, tensorboard_available

        if not tensorboard_available():
            raise ConfigError(INSTALL_HINT)
