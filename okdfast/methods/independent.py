"""``independent``: K branches on a shared trunk, each trained with cross-entropy only (OKDDip code ``--ind``).

The control for every distillation method: same network, no knowledge transfer between branches.
"""

from __future__ import annotations

from torch import Tensor

from okdfast.methods.base import LossTerms, Method, MethodConfig, MethodOutput
from okdfast.methods.registry import register_method


@register_method
class Independent(Method):
    name = "independent"

    def __init__(self, arch: str, num_classes: int, config: MethodConfig) -> None:
        super().__init__(arch, num_classes, config)
        self.net = self.build_net()

    def forward(self, images: Tensor) -> MethodOutput:
        return MethodOutput(self.net(images).logits)

    def loss(self, output: MethodOutput, target: Tensor, kd_weight: Tensor | float) -> LossTerms:
        return LossTerms(*self.online_kd(output, target, 0.0))
