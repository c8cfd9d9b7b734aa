"""MDE's Classifier Diversification (CD) loss: argument checks in front of the reference.

The loss reads the auxiliary classifiers' weight matrices, (K-1, C, D): at CIFAR shapes a few tens of kilobytes per
step, against megabytes of activations. It is launch-bound, not memory-bound, so it has no Triton kernel: under
``--compile`` Inductor fuses the reference into the train step's graph, and eagerly it is a handful of small ops.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from okdfast.ops.reference import CD_FORMS, classifier_diversity_reference

__all__ = ["CD_FORMS", "classifier_diversity_loss", "validate_classifier_diversity_args"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def validate_classifier_diversity_args(weights: Tensor, form: str, eps: float) -> None:
    """Raise a ValueError naming the argument and the fix."""
    if not isinstance(weights, Tensor) or weights.dim() != 3:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(
            f"weights: expected (M, C, D), the M classifiers' weight matrices stacked, got {shape}; "
            "use torch.stack([fc.weight for fc in heads])"
        )
    num_classifiers, num_classes, dim = weights.shape
    if weights.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weights: dtype {weights.dtype} is not supported; use float32, bfloat16 or float16")
    if num_classifiers < 2:
        raise ValueError(f"weights: M={num_classifiers}; the diversity of classifiers needs M >= 2 of them")
    if num_classes < 1 or dim < 1:
        raise ValueError(f"weights: C={num_classes}, D={dim}; both must be >= 1")
    if form not in CD_FORMS:
        raise ValueError(f"form={form!r}: use one of {', '.join(CD_FORMS)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps={eps!r}: must be a finite number > 0 (the smallest norm a cosine divides by)")


def classifier_diversity_loss(weights: Tensor, form: str = "frobenius", *, eps: float = 1e-8) -> Tensor:
    """The CD loss of (M, C, D) classifier weights; see :func:`okdfast.ops.reference.classifier_diversity_reference`
    for the three forms."""
    validate_classifier_diversity_args(weights, form, eps)
    return classifier_diversity_reference(weights, form, eps=eps)
