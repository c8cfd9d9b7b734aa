"""Methods by name: ``@register_method`` on the class, ``create_method(name, ...)`` to build one."""

from __future__ import annotations

from okdfast.methods.base import Method, MethodConfig
from okdfast.utils.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a Method under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    return METHODS.add(cls.name, cls)


def list_methods(pattern: str = "*") -> list[str]:
    return METHODS.names(pattern)


def method_class(name: str) -> type[Method]:
    return METHODS.get(name)


def create_method(name: str, arch: str, num_classes: int, config: MethodConfig | None = None) -> Method:
    cls = method_class(name)
    config = config or MethodConfig(num_branches=cls.default_branches)
    return cls(arch, num_classes, config)
