"""How a config message names a field and shows a value: ``--batch-size``, and a value cut to a readable length
(no message prints a whole value, however large)."""

from __future__ import annotations

import reprlib
from typing import Any


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


_SHOW_CHARS = 80  # the most of one value a message prints
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 6, 6, 6, 40, 40


def shorten(text: str, limit: int = _SHOW_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out: no message prints a whole value."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def show_value(value: Any) -> str:
    """A value as a message shows it: flags' spelling for numbers, words and short lists; bounded for anything."""
    if isinstance(value, list | tuple) and len(value) <= 20 and all(_is_plain(v) for v in value):
        return shorten(" ".join(show_value(v) for v in value))
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"(an integer of {value.bit_length()} bits)"
    if isinstance(value, str):
        return shorten(repr(value) if not value or " " in value else value)
    return shorten(str(value)) if _is_plain(value) else _REPR.repr(value)


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)
