"""``cl_ilr``: Collaborative Learning with Intermediate-Level Representation sharing and backprop rescaling.
Guocong Song, Wei Chai, "Collaborative Learning for Deep Neural Networks", NeurIPS 2018 (OKDDip code: --avg
--bpscale).

Shared trunk + K branches; branch k's teacher is the mean of the other branches' logits:
    t_k = (1/(K-1)) sum_{j != k} z_j
    L = sum_k CE(z_k, y) + alpha * w(e) * sum_k T^2 KL(p^T(t_k) || p^T(z_k))
ILR (backprop rescaling): the gradient that flows from the branches into the shared trunk is divided by K
(identity forward), applied once on the trunk output as in the OKDDip code.

Deviations / choices: like the OKDDip code the targets t_k are not detached by default (``--detach-teacher``
detaches them as Song & Chai's paper does, where the soft targets are treated as constants). The paper mixes the
soft-target and label losses with a weight beta; we use METHOD.md's alpha * w(e) on the KL only.
"""

from __future__ import annotations

from torch import Tensor

from okdfast.methods.base import LossTerms, Method, MethodConfig, MethodOutput
from okdfast.methods.registry import register_method
from okdfast.models import MultiBranchNet


def mean_of_other_branches(logits: Tensor) -> Tensor:
    """(B, K, C) -> (B, K, C) whose k-th row is (1/(K-1)) sum_{j != k} z_j."""
    num_branches = logits.shape[1]
    return (logits.sum(dim=1, keepdim=True) - logits) / (num_branches - 1)


@register_method
class CLILR(Method):
    name = "cl_ilr"

    def __init__(self, arch: str, num_classes: int, config: MethodConfig) -> None:
        super().__init__(arch, num_classes, config)
        self.net = MultiBranchNet(arch, num_classes, num_branches=config.num_branches)
        self.net.trunk_grad_scale = 1.0 / config.num_branches  # ILR

    def forward(self, images: Tensor) -> MethodOutput:
        logits = self.net(images).logits
        return MethodOutput(logits, teacher=mean_of_other_branches(logits))

    def loss(self, output: MethodOutput, target: Tensor, kd_scale: float) -> LossTerms:
        return LossTerms(
            *self.online_kd(output.logits, target, output.teacher, kd_scale=kd_scale, detach_default=False)
        )
