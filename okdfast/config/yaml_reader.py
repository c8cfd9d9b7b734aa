"""Every YAML file okdfast reads (a --config, a run's config.yaml, the tables file), read one way: UTF-8 text,
PyYAML's safe loader (no Python tags), nesting, size and alias expansion bounded, no duplicate keys, and optionally
no plain scalar that YAML 1.1 and 1.2 read differently. A refusal is one ConfigError naming the file and the line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from okdfast.config.messages import shorten
from okdfast.errors import ConfigError

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


def yaml11_number_hint(value: Any, integer: bool = False) -> str:
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
