"""Methods by name: ``@register_method`` on the class, ``create_method(name, ...)`` to build one."""

from __future__ import annotations

from fnmatch import fnmatch

from okdfast.methods.base import Method, MethodConfig

_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


def list_methods(pattern: str = "*") -> list[str]:
    return sorted(name for name in _METHODS if fnmatch(name, pattern))


def method_class(name: str) -> type[Method]:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(list_methods())}")
    return _METHODS[name]


def create_method(name: str, arch: str, num_classes: int, config: MethodConfig | None = None) -> Method:
    cls = method_class(name)
    config = config or MethodConfig(num_branches=cls.default_branches)
    return cls(arch, num_classes, config)
