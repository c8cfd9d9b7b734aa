"""Which config values make a run what it is (its recipe), and which only say how this process runs it.

One table, read by three places that must agree:

- resume (``okdfast.run.resume``): a resumed run keeps its own config. A value of :data:`SESSION_FIELDS` always comes
  from the command that resumes (where to stop, how to report); one of :data:`TUNABLE_FIELDS` keeps the run's value
  unless the command sets it, and a change is applied and recorded in ``sessions.jsonl`` (how fast it runs, where
  the data lie: nothing the maths depends on beyond float rounding); every other field is the recipe, and a command
  that contradicts it is refused with the list of differences.
- ``okdfast.plot`` and ``okdfast.reproduce`` pool runs as seeds of one experiment only when they are equal in every
  field except :data:`POOLING_EXEMPT` (the seed, and what does not change the maths).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

# From the command that (re)starts the run, never from the stored config.
SESSION_FIELDS = frozenset({"out", "resume", "max_steps", "progress", "log_every", "download"})
# Stored with the run; a command may change them (speed, paths, reporting), and the change is recorded.
TUNABLE_FIELDS = frozenset(
    {
        "workers",
        "loader",
        "device",
        "data_dir",
        "eval_batch_size",
        "nan_check_every",
        "tensorboard",
        "compile",
        "channels_last",
        "cuda_graphs",
        "optimizer_impl",
        "fused_loss",
        "deterministic",
    }
)
# Not part of what is compared when runs are pooled as seeds: the seed itself, and implementation choices that
# change only float rounding (branch_impl must match on resume, because optimizer states are not converted).
# Keys config.yaml holds besides the fields (derived values, written for people and tools by okdfast.train). They
# are exempt from pooling too (they follow from the fields, or name paths), except ``data``, the fingerprint of
# the data set itself: runs on other data are never pooled, whatever their data_dir says.
DERIVED_KEYS = frozenset(
    {"data_source", "world_size", "parameters", "milestones_epochs", "num_classes", "amp_dtype", "data", "data_file"}
)
POOLING_EXEMPT = SESSION_FIELDS | TUNABLE_FIELDS | (DERIVED_KEYS - {"data"}) | {"seed", "branch_impl"}


# Fields with a value that means "resolve the default" (a stored config holds what it resolved to): that value
# does not contradict the stored one, whether a flag, a plan or a caller of run() gives it.
UNSET = {"branches": None, "rampup_epochs": None, "amp": None, "channels_last": None, "compile": None,
         "branch_impl": "auto"}  # fmt: skip


def is_unset(name: str, value: Any) -> bool:
    return name in UNSET and value == UNSET[name] and type(value) is type(UNSET[name])


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def differences(stored: Mapping[str, Any], given: Mapping[str, Any], fields: Iterable[str]) -> list[str]:
    """'--lr 0.05 (the run: 0.1)' for every field in ``fields`` whose given value differs from the stored one."""
    out = []
    for name in fields:
        if name in given and not same_value(stored.get(name), given[name]):
            out.append(f"{flag(name)} {_show(given[name])} (the run: {_show(stored.get(name))})")
    return out


def same_value(a: Any, b: Any) -> bool:
    """Equality as a config value (1 == 1.0; lists and tuples alike)."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    return a == b


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " ".join(_show(v) for v in value)
    if value is None:
        return "unset"
    return str(value)


def pooling_key(config: Mapping[str, Any]) -> str:
    """A key equal for two runs exactly when they may be pooled as seeds of one experiment (their stored
    config.yaml values, every field but :data:`POOLING_EXEMPT`; a field one run lacks counts as unset)."""
    kept = {k: _canonical(v) for k, v in config.items() if k not in POOLING_EXEMPT and v is not None}
    return json.dumps(kept, sort_keys=True)


def pooling_differences(configs: list[Mapping[str, Any]]) -> list[str]:
    """The recipe fields whose values are not the same in all ``configs`` (to label groups that differ)."""
    names = sorted({k for c in configs for k in c} - POOLING_EXEMPT)
    return [n for n in names if len({json.dumps(_canonical(c.get(n))) for c in configs}) > 1]


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value
