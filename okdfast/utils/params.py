"""One home per hyper-parameter: a dataclass field that carries its default, its help text and its check.

    temperature: float = param(DEFAULT_TEMPERATURE, help="temperature T of the distillation softmax",
                               check=temperature_problem)

The field is declared once, where its owner lives (a method's hyper-parameters in ``okdfast.methods.base
.MethodConfig``, a run's settings in ``okdfast.config.train_config.TrainConfig``); a config class that carries the
same value takes the declaration with :func:`same_param` instead of writing it again. The command line reads the help
text (``okdfast.config.command_line``), both config classes run the checks (:func:`param_problems`), each wording the
complaint for its callers (``--flag value: problem`` on the command line, ``name=value: problem`` in Python).

A check takes the value and returns what is wrong with it (one clause, e.g. ``must be >= 0``) or None. ``None``
values are not checked: whether a field may be None is its type's business.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

Check = Callable[[Any], "str | None"]
HELP, CHECK = "help", "check"


def param(
    default: Any = dataclasses.MISSING,
    *,
    help: str,  # noqa: A002  (argparse's word for it)
    check: Check | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its help text and its check as metadata."""
    metadata = {HELP: help, CHECK: check}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_of(cls: type, name: str) -> dataclasses.Field:
    found = {f.name: f for f in dataclasses.fields(cls)}
    if name not in found:
        raise AssertionError(f"{cls.__name__} has no field {name!r}")
    return found[name]


def same_param(cls: type, name: str) -> Any:
    """The declaration of ``cls``'s field ``name`` (default, help, check) for another config class's field."""
    f = field_of(cls, name)
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
    return dataclasses.field(default=f.default, metadata=f.metadata)


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get(HELP) or f.name.replace("_", " ")


def check_of(cls: type, name: str) -> Check | None:
    return field_of(cls, name).metadata.get(CHECK)


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def param_problems(config: Any) -> Iterator[tuple[str, Any, str]]:
    """(name, value, problem) of every field of ``config`` whose check refuses its value, in field order."""
    for f in dataclasses.fields(config):
        check, value = f.metadata.get(CHECK), getattr(config, f.name)
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                yield f.name, value, problem


# The checks more than one field uses.
def at_least(low: float, why: str = "") -> Check:
    return lambda value: f"must be >= {low:g}{why}" if value < low else None


def above(low: float) -> Check:
    return lambda value: None if value > low else f"must be > {low:g}"


def one_of(choices: Sequence[Any]) -> Check:
    """Refuses a value outside ``choices`` (None in them only says the field may be unset)."""
    words = ", ".join(str(c) for c in choices if c is not None)
    return lambda value: None if value in choices else f"use {words}"


def all_of(*checks: Check) -> Check:
    def check(value: Any) -> str | None:
        for one in checks:
            problem = one(value)
            if problem:
                return problem
        return None

    return check
