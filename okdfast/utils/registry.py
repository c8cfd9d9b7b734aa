"""The one name -> object registry behind okdfast's data sets, backbones and methods (``okdfast.data.registry``,
``okdfast.models.registry``, ``okdfast.methods.registry``): registration refuses a name twice, a lookup of an
unknown name names the known ones, listing filters by an fnmatch pattern."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """``kind`` ("dataset", "model", "method") is how the messages name an entry."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            owner = getattr(self._entries[name], "__module__", "?")
            raise ValueError(f"{self.kind} name {name!r} is already registered (by {owner})")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator(name)``: register the decorated object under ``name``."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise self.unknown(name)
        return self._entries[name]

    def unknown(self, name: str) -> ValueError:
        """The error for a name that is not registered: it names the known ones."""
        return ValueError(f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}")

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching the fnmatch ``pattern`` (e.g. ``"resnet*"``)."""
        return sorted(fnmatch.filter(self._entries, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]
