"""Backbones registered by name (timm style): ``@register_model("resnet32")``, ``create_arch``, ``list_models``.

A registered builder takes ``num_classes`` and returns an :class:`~okdfast.models.parts.ArchParts`. The built-in
backbones register themselves when ``okdfast.models`` is imported, which Python does before any of its modules.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from okdfast.models.parts import ArchParts

ArchBuilder = Callable[[int], ArchParts]

_REGISTRY: dict[str, ArchBuilder] = {}


def register_model(name: str) -> Callable[[ArchBuilder], ArchBuilder]:
    """Decorator: register ``fn(num_classes) -> ArchParts`` under ``name`` (a second use of a name is an error)."""

    def decorator(fn: ArchBuilder) -> ArchBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered (by {_REGISTRY[name].__module__})")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered names matching the fnmatch ``pattern`` (e.g. ``"resnet*"``)."""
    return sorted(fnmatch.filter(_REGISTRY, pattern))


def create_arch(name: str, num_classes: int) -> ArchParts:
    """Build the trunk and the branch factory of the backbone ``name`` for ``num_classes`` classes."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: must be a positive int (10 for CIFAR-10, 100 for CIFAR-100)")
    return _REGISTRY[name](num_classes)
