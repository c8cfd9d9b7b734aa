"""torch.library ops of okdfast (``torch.ops.okdfast.*``), their autograd and their CPU / Triton dispatch.

Importing this package registers ``okdfast::online_kd_loss``, ``okdfast::classifier_diversity_loss`` and
``okdfast::scale_saved_grad``. The pure-PyTorch references (the spec) live in :mod:`okdfast.ops.reference`.
"""

from okdfast.ops.classifier_diversity import classifier_diversity_loss
from okdfast.ops.dispatch import fused_enabled, use_triton
from okdfast.ops.online_kd import online_kd_loss_and_terms

__all__ = ["classifier_diversity_loss", "fused_enabled", "online_kd_loss_and_terms", "use_triton"]
