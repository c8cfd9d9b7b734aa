"""``dml``: Deep Mutual Learning. Ying Zhang, Tao Xiang, Timothy M. Hospedales, Huchuan Lu, CVPR 2018.

K independent networks (no shared trunk); network k learns from the labels and from every peer:
    L_k = CE(z_k, y) + alpha * w(e) * (1/(K-1)) sum_{j != k} T^2 KL(p^T(z_j) || p^T(z_k)),   p^T(z_j) detached.
The total loss is sum_k L_k, one optimizer step for all networks.

Deviations from the paper: the original DML updates the networks one after another within a step (each sees
its peers' fresh predictions); like the OKDDip code, we update all networks jointly in one step. The temperature
and ramp-up follow docs/METHOD.md (T = 3, T^2 scaling, sigmoid ramp-up) rather than DML's T = 1 without ramp-up.
"""

from __future__ import annotations

from torch import Tensor

from okdfast.methods.base import LossTerms, Method, MethodConfig, MethodOutput
from okdfast.methods.registry import register_method


@register_method
class DML(Method):
    name = "dml"

    def __init__(self, arch: str, num_classes: int, config: MethodConfig) -> None:
        super().__init__(arch, num_classes, config)
        self.net = self.build_net(shared_trunk=False)

    def forward(self, images: Tensor) -> MethodOutput:
        return MethodOutput(self.net(images).logits)

    def loss(self, output: MethodOutput, target: Tensor, kd_weight: Tensor | float) -> LossTerms:
        return LossTerms(*self.online_kd(output, target, kd_weight, mode="peer", detach_default=True))
