"""``okddip``: Online Knowledge Distillation with Diverse Peers. Defang Chen, Jian-Ping Mei, Can Wang, Yan Feng,
Chun Chen, AAAI 2020 (code: github.com/DefangChen/OKDDip, train_GL.py / resnet_GL.py). docs/METHOD.md section 2.

Shared trunk + K branches: K-1 auxiliary peers and one group leader (the last branch). Two-level distillation:
    q_i = W_q s_i, k_i = W_k s_i        s_i = pooled last-block feature of peer i; W_q, W_k: D -> D/8, no bias
    a_ij = softmax_j(q_i . k_j)         over all peers j, self included, no 1/sqrt(d) scaling (as in the code)
    t_i = sum_j a_ij z_j                peer i's target: attention-weighted peer logits
    t_leader = (1/(K-1)) sum_i z_i      the leader distils from the mean of the peers
    L = sum_k CE(z_k, y) + alpha * w(e) * [sum_i T^2 KL(p^T(t_i) || p^T(z_i)) + T^2 KL(p^T(t_leader) || p^T(z_L))]
Nothing is detached in the reference code (the KL gradient is the only one that trains W_q and W_k); that is the
default here; ``--detach-teacher`` detaches every target (then W_q, W_k receive no gradient).
The evaluated head is the leader (what the OKDDip code reports and checkpoints).

Deviations: the reference KL adds 1e-7 to the target probabilities; we do not. The query/key input is the pooled
last-block feature that enters the classifier (global average; for VGG-16 the global max of the 2x2 map, which is
the OKDDip code's flattened 1x1 map after its last max-pool).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from okdfast.methods.base import LossTerms, MethodConfig, MethodOutput
from okdfast.methods.registry import register_method
from okdfast.methods.two_level import TwoLevelMethod


class PeerAttention(nn.Module):
    """Query/key projections shared by the peers; returns the (B, P, P) attention over peers."""

    def __init__(self, channels: int, factor: int = 8) -> None:
        super().__init__()
        self.query = nn.Linear(channels, max(channels // factor, 1), bias=False)
        self.key = nn.Linear(channels, max(channels // factor, 1), bias=False)

    def forward(self, pooled: Tensor) -> Tensor:  # pooled (B, P, D)
        energy = torch.einsum("bid,bjd->bij", self.query(pooled), self.key(pooled))
        return torch.softmax(energy, dim=-1)


@register_method
class OKDDip(TwoLevelMethod):
    name = "okddip"

    def __init__(self, arch: str, num_classes: int, config: MethodConfig) -> None:
        super().__init__(arch, num_classes, config)
        self.attention = PeerAttention(self.net.feature_channels)

    def forward(self, images: Tensor) -> MethodOutput:
        out = self.net(images)
        attention = self.attention(out.pooled[:, :-1])  # (B, P, P) from the peers' pooled features
        return MethodOutput(out.logits, teacher_weights=self.teacher_weights(attention), attention=attention)

    def loss(self, output: MethodOutput, target: Tensor, kd_weight: Tensor | float) -> LossTerms:
        return LossTerms(*self.online_kd(output, target, kd_weight, detach_default=False))
