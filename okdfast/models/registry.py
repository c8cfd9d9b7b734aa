"""Backbones registered by name (timm style): ``@register_model("resnet32")``, ``create_arch``, ``list_models``.

A registered builder takes ``num_classes`` and returns an :class:`~okdfast.models.parts.ArchParts`. The built-in
backbones register themselves when ``okdfast.models`` is imported, which Python does before any of its modules.
"""

from __future__ import annotations

from collections.abc import Callable

from okdfast.models.parts import ArchParts
from okdfast.utils.registry import Registry

ArchBuilder = Callable[[int], ArchParts]

MODELS: Registry[ArchBuilder] = Registry("model")


def register_model(name: str) -> Callable[[ArchBuilder], ArchBuilder]:
    """Decorator: register ``fn(num_classes) -> ArchParts`` under ``name`` (a second use of a name is an error)."""
    return MODELS.decorator(name)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered names matching the fnmatch ``pattern`` (e.g. ``"resnet*"``)."""
    return MODELS.names(pattern)


def create_arch(name: str, num_classes: int) -> ArchParts:
    """Build the trunk and the branch factory of the backbone ``name`` for ``num_classes`` classes."""
    builder = MODELS.get(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: must be a positive int (10 for CIFAR-10, 100 for CIFAR-100)")
    return builder(num_classes)
