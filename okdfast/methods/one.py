"""``one``: On-the-fly Native Ensemble. Xu Lan, Xiatian Zhu, Shaogang Gong, NeurIPS 2018.

Shared trunk + K branches; a gate on the trunk output weights the branch logits into the teacher:
    g = softmax(ReLU(BN1d(Linear_{Ct -> K}(AvgPool(x_trunk)))))        (B, K)
    t = sum_k g_k z_k                                                  (B, C)
    L = sum_k CE(z_k, y) + CE(t, y) + alpha * w(e) * sum_k T^2 KL(p^T(t) || p^T(z_k))

Deviations / choices: as in the OKDDip code (docs/METHOD.md's reference), the teacher is NOT detached in the KL term by
default, so the KL gradient also reaches the gate and all branches through t; the original ONE code detaches it:
``--detach-teacher`` gives that variant. OKDDip's KL adds 1e-7 to the teacher probabilities; we do not.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from okdfast.methods.base import LossTerms, Method, MethodConfig, MethodOutput
from okdfast.methods.registry import register_method


class BranchGate(nn.Module):
    """ONE's gate: AvgPool -> Linear(Ct -> K) -> BatchNorm1d(K) -> ReLU -> softmax over the K branches."""

    def __init__(self, in_channels: int, num_branches: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_branches)
        self.bn = nn.BatchNorm1d(num_branches)

    def forward(self, trunk: Tensor) -> Tensor:
        pooled = trunk.mean(dim=(-2, -1))
        return torch.softmax(torch.relu(self.bn(self.fc(pooled))), dim=-1)


@register_method
class ONE(Method):
    name = "one"
    head_name = "gate"  # the gate-weighted ensemble t = sum_k g_k z_k

    def __init__(self, arch: str, num_classes: int, config: MethodConfig) -> None:
        super().__init__(arch, num_classes, config)
        self.net = self.build_net()
        self.gate = BranchGate(self.net.trunk_channels, config.num_branches)

    def forward(self, images: Tensor) -> MethodOutput:
        out = self.net(images)
        gate = self.gate(out.trunk)  # (B, K): one shared teacher, formed by the loss op from the logits
        return MethodOutput(out.logits, teacher_weights=gate, attention=gate)

    def loss(self, output: MethodOutput, target: Tensor, kd_weight: Tensor | float) -> LossTerms:
        return LossTerms(*self.online_kd(output, target, kd_weight, detach_default=False, teacher_ce_weight=1.0))

    def heads(self, output: MethodOutput) -> dict[str, Tensor]:
        return {"gate": torch.einsum("bk,bkc->bc", output.teacher_weights.to(output.logits.dtype), output.logits)}
