"""Online-KD methods, one file each; importing this package registers them all."""

from okdfast.methods import baseline, cl_ilr, dml, independent, mde, okddip, one  # noqa: F401  (registration)
from okdfast.methods.base import LossTerms, Method, MethodConfig, MethodOutput, sigmoid_rampup
from okdfast.methods.registry import create_method, list_methods, method_class, register_method

__all__ = [
    "LossTerms",
    "Method",
    "MethodConfig",
    "MethodOutput",
    "create_method",
    "list_methods",
    "method_class",
    "register_method",
    "sigmoid_rampup",
]
