"""torch.library ops of okdfast (``torch.ops.okdfast.*``), their autograd and their CPU / Triton dispatch.

Importing this package registers ``okdfast::online_kd_fwd`` and ``okdfast::online_kd_bwd`` (MDE's head,
``okdfast.ops.mde_head``, runs through them). The pure-PyTorch
references (the spec, the CPU path and the test oracle) live in :mod:`okdfast.ops.reference`.
"""

import okdfast.ops.online_kd  # noqa: F401  (registers the ops)
from okdfast.ops.classifier_diversity import classifier_diversity_loss
from okdfast.ops.dispatch import fused_enabled, use_triton
from okdfast.ops.mde_head import mde_head
from okdfast.ops.mde_head_options import MDEHeadOptions, MDEHeadTerms
from okdfast.ops.online_kd_options import OnlineKDOptions, OnlineKDTerms

__all__ = [
    "MDEHeadOptions",
    "MDEHeadTerms",
    "OnlineKDOptions",
    "OnlineKDTerms",
    "classifier_diversity_loss",
    "fused_enabled",
    "mde_head",
    "use_triton",
]
