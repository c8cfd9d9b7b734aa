"""torch.library ops of okdfast (``torch.ops.okdfast.*``), their autograd and their CPU / Triton dispatch.

Importing this package registers ``okdfast::online_kd_fwd`` / ``okdfast::online_kd_bwd`` and
``okdfast::mde_head_fwd`` / ``okdfast::mde_head_bwd``. The pure-PyTorch
references (the spec, the CPU path and the test oracle) live in :mod:`okdfast.ops.reference`.
"""

import okdfast.ops.mde_head  # noqa: F401  (registers the ops)
import okdfast.ops.online_kd  # noqa: F401
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
