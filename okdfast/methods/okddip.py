"""``okddip``: Online Knowledge Distillation with Diverse Peers. Defang Chen, Jian-Ping Mei, Can Wang, Yan Feng,
Chun Chen, AAAI 2020 (code: github.com/DefangChen/OKDDip, train_GL.py / resnet_GL.py).

Shared trunk + K branches: K-1 peers and one group leader (the last branch).
Two-level distillation:
    q_i = W_q f_i, k_i = W_k f_i        f_i = pooled last-block features of peer i; W_q, W_k: D -> D/8, no bias
    a_ij = softmax_j(q_i . k_j)         over all peers j, self included, no 1/sqrt(d) scaling (as in the code)
    t_i = sum_j a_ij z_j                peer i's target: attention-weighted peer logits
    t_leader = (1/(K-1)) sum_i z_i      the leader distils from the mean of the peers
    L = sum_k CE(z_k, y) + alpha * w(e) * [sum_i T^2 KL(p^T(t_i) || p^T(z_i)) + T^2 KL(p^T(t_leader) || p^T(z_L))]
Nothing is detached in the reference code (the KL gradient is the only one that trains W_q and W_k); that is the
default here; ``--detach-teacher`` detaches every target (then W_q, W_k receive no gradient).
The evaluated head is the leader (what the OKDDip code reports and checkpoints).

Deviations: the query/key input is the global average of the last-block features (for VGG-16 the OKDDip code
flattens the 1x1 map after the last max-pool; we average the 2x2 map before it). The reference KL adds 1e-7 to
the target probabilities; we do not.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from okdfast.methods.base import LossTerms, Method, MethodConfig, MethodOutput
from okdfast.methods.registry import register_method
from okdfast.models import MultiBranchNet


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
class OKDDip(Method):
    name = "okddip"
    has_head = True
    head_name = "leader"
    default_branches = 4  # 3 peers + 1 leader, the OKDDip default
    min_branches = 3  # at least two peers to attend over, plus the leader

    def __init__(self, arch: str, num_classes: int, config: MethodConfig) -> None:
        super().__init__(arch, num_classes, config)
        self.net = MultiBranchNet(arch, num_classes, num_branches=config.num_branches)
        self.attention = PeerAttention(self.net.feature_channels)

    def forward(self, images: Tensor) -> MethodOutput:
        out = self.net(images)
        peer_logits = out.logits[:, :-1]  # (B, P, C)
        pooled = out.features[:, :-1].mean(dim=(-2, -1))  # (B, P, D)
        attention = self.attention(pooled)  # (B, P, P)
        peer_targets = torch.einsum("bij,bjc->bic", attention, peer_logits)
        leader_target = peer_logits.mean(dim=1, keepdim=True)
        teacher = torch.cat([peer_targets, leader_target], dim=1)  # (B, K, C) per-branch targets
        return MethodOutput(out.logits, teacher=teacher, head=out.logits[:, -1])

    def loss(self, output: MethodOutput, target: Tensor, kd_scale: float) -> LossTerms:
        return LossTerms(
            *self.online_kd(output.logits, target, output.teacher, kd_scale=kd_scale, detach_default=False)
        )
