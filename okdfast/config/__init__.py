"""The run's configuration: :class:`TrainConfig` (every field a CLI flag and a YAML key, declared once with its
default, help text and check), the command line that fills it (:func:`parse_config`), the YAML reader every okdfast
YAML file goes through (:func:`read_yaml`), and which fields are a run's recipe (``okdfast.config.recipe``).

Every value is checked once, for its type and its range, by :meth:`TrainConfig.validate`, whether it came from a
flag, from YAML or from a caller of :func:`okdfast.train.run`: ``epochs: 1.5``, ``nesterov: "no"`` or
``--label-smoothing 2`` are refused with a :class:`~okdfast.errors.ConfigError` naming the value and the fix,
before anything is built.
"""

from okdfast.config.command_line import (
    HELP_GROUPS,
    KD_FIELDS,
    MDE_FIELDS,
    NO_KD_METHODS,
    OneLineParser,
    build_parser,
    ignored_flags,
    load_yaml,
    parse_config,
)
from okdfast.config.messages import shorten
from okdfast.config.train_config import STORED_EXTRA_KEYS, TrainConfig
from okdfast.config.yaml_reader import YAML_MAX_BYTES, YAML_MAX_DEPTH, YAML_MAX_NODES, read_yaml

__all__ = [
    "HELP_GROUPS",
    "KD_FIELDS",
    "MDE_FIELDS",
    "NO_KD_METHODS",
    "STORED_EXTRA_KEYS",
    "YAML_MAX_BYTES",
    "YAML_MAX_DEPTH",
    "YAML_MAX_NODES",
    "OneLineParser",
    "TrainConfig",
    "build_parser",
    "ignored_flags",
    "load_yaml",
    "parse_config",
    "read_yaml",
    "shorten",
]
