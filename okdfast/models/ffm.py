"""The Feature Fusion Module (FFM) of MDE (Li et al., ACCV 2020): attention over the K branches computed from the
fused last-block features of all branches (ONE's gate computes it from the shared low-level features instead).

    s = GAP(sum_k F_k)                    (B, D)   fuse: the branches' last-block features, summed and pooled
    h = ReLU(BN(W1 s))                    (B, R)   R = max(D // reduction, min_hidden)
    a = softmax_k(W2 h + b2)              (B, K)   attention over the branches

The teacher is t = sum_k a_k z_k (see okdfast/methods/mde.py). The squeeze-and-excite shape (sum -> pool ->
bottleneck FC -> softmax across branches) follows the selective-kernel fusion that the same first author's later
OKD work uses; the paper's text available to us confirms only the FFM's inputs and purpose (METHOD.md section 3),
so this layer layout is our reading, recorded in mde.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FeatureFusionModule(nn.Module):
    def __init__(self, channels: int, num_branches: int, reduction: int = 4, min_hidden: int = 32) -> None:
        super().__init__()
        hidden = max(channels // reduction, min_hidden)
        self.channels = channels
        self.num_branches = num_branches
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, num_branches)

    def fuse(self, features: Tensor) -> Tensor:
        """(B, K, D, H, W) -> (B, D): global average pool of the sum over branches."""
        return features.sum(dim=1).mean(dim=(-2, -1))

    def forward(self, features: Tensor) -> Tensor:
        """features (B, K, D, H, W) -> attention (B, K) over the branches (rows sum to 1)."""
        if features.dim() != 5 or features.shape[1] != self.num_branches or features.shape[2] != self.channels:
            raise ValueError(
                f"FeatureFusionModule expects features (B, {self.num_branches}, {self.channels}, H, W), "
                f"got {tuple(features.shape)}"
            )
        hidden = torch.relu(self.bn(self.fc1(self.fuse(features))))
        return torch.softmax(self.fc2(hidden), dim=-1)
