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
soft-target and label losses with a weight beta; we use docs/METHOD.md's alpha * w(e) on the KL only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from okdfast.methods.base import LossTerms, Method, MethodConfig, MethodOutput
from okdfast.methods.registry import register_method


def mean_of_others_weights(num_branches: int) -> Tensor:
    """(1, K, K) constant teacher weights: row k is 1/(K-1) on every branch j != k, 0 on k itself."""
    eye = torch.eye(num_branches)
    return ((1.0 - eye) / (num_branches - 1)).unsqueeze(0)


@register_method
class CLILR(Method):
    name = "cl_ilr"

    def __init__(self, arch: str, num_classes: int, config: MethodConfig) -> None:
        super().__init__(arch, num_classes, config)
        self.net = self.build_net()
        self.net.trunk_grad_scale = 1.0 / config.num_branches  # ILR
        self.register_buffer("teacher_weights", mean_of_others_weights(config.num_branches), persistent=False)

    def forward(self, images: Tensor) -> MethodOutput:
        return MethodOutput(self.net(images).logits, teacher_weights=self.teacher_weights)

    def loss(self, output: MethodOutput, target: Tensor, kd_weight: Tensor | float) -> LossTerms:
        return LossTerms(*self.online_kd(output, target, kd_weight, detach_default=False))
