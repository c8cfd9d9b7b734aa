"""``baseline``: one plain network trained with cross-entropy (the single-model row of every table)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from okdfast.methods.base import LossTerms, Method, MethodConfig, MethodOutput
from okdfast.methods.registry import register_method


@register_method
class Baseline(Method):
    name = "baseline"
    default_branches = 1
    min_branches = 1
    max_branches = 1

    def __init__(self, arch: str, num_classes: int, config: MethodConfig) -> None:
        if config.num_branches != 1:
            raise ValueError(f"method 'baseline' trains one network: use --branches 1, got {config.num_branches}")
        super().__init__(arch, num_classes, config)
        self.net = self.build_net()

    def forward(self, images: Tensor) -> MethodOutput:
        return MethodOutput(self.net(images).logits)

    def loss(self, output: MethodOutput, target: Tensor, kd_weight: Tensor | float) -> LossTerms:
        ce = F.cross_entropy(output.logits[:, 0].float(), target, label_smoothing=self.config.label_smoothing)
        return LossTerms(ce, {"ce": ce.detach()})
