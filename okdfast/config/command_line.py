"""The command line and its YAML file: ``--FLAG VALUE`` for every :class:`TrainConfig` field (its help text from the
field's declaration), ``--config run.yaml`` with the same keys, precedence command line > YAML > defaults, one
validated config, and the one-line warning about flags that do nothing for the chosen method.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from okdfast.config.messages import flag_name, shorten, show_value
from okdfast.config.recipe import DERIVED_KEYS, SESSION_FIELDS
from okdfast.config.train_config import TrainConfig
from okdfast.config.yaml_reader import read_yaml
from okdfast.errors import ConfigError
from okdfast.utils.params import default_of, help_of


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
        default = default_of(f)
        options: dict[str, Any] = {"help": help_of(f)}
        if not explicit_only:
            options["default"] = None if f.type == "bool | None" else default
        if f.name in ("amp", "compile"):
            const = "auto" if f.name == "amp" else "default"
            group.add_argument(flag_name(f.name), nargs="?", const=const, **options)
        elif f.type in ("bool", "bool | None"):
            group.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, **options)
        elif f.name == "milestones":
            group.add_argument(flag_name(f.name), type=float, nargs="+", **options)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            group.add_argument(flag_name(f.name), type=kind, **options)
    return parser


# YAML 1.1 (PyYAML) reads unquoted on/off/yes/no as booleans; for the fields whose values are words like 'on' and
# 'off' (--ffm off, --amp off, --progress off) a boolean there means that word.
_WORD_FOR_BOOL = {True: "on", False: "off"}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The config values of a YAML file, keys as field names (``batch-size`` and ``batch_size`` alike, but not
    both). A run's own config.yaml is a config too: its derived keys (okdfast.config.recipe.DERIVED_KEYS) and its
    session fields (where it wrote, how far it went) are left out. Types and ranges are checked by
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
            raise ConfigError(f"{where}: the key {show_value(key)} is not a name; keys are the flags' names")
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
    mde_named = ", ".join(map(flag_name, mde_only)) if kd_only else ("it" if len(mde_only) == 1 else "them")
    why = ([f"only mde reads {mde_named}"] if mde_only else []) + (
        [f"{config.method} trains with cross-entropy only, no distillation"] if kd_only else []
    )
    flags = ", ".join(map(flag_name, mde_only + kd_only))
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
