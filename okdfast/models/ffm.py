"""The Feature Fusion Module (FFM) of MDE (Li et al., ACCV 2020; docs/METHOD.md section 3).

The paper's figure fixes the FFM's inputs and output: from every auxiliary branch i its feature s_i (the pooled
last-block feature that enters the branch's FC) and its logits t_i go in, one target comes out. The layers in
between are our reading (docs/METHOD.md, "our reading"):

    s = sum_i s_i                         (B, D)     fuse the K-1 auxiliary features (= the pool of the summed maps)
    h = ReLU(BN(W1 s))                    (B, R)     R = max(D // reduction, min_hidden)
    a = softmax_i(W2 h + b2)              (B, K-1)   attention over the auxiliary branches
    target = sum_i a_i t_i                (B, C)     formed by the loss op from the logits it already holds

``forward(pooled)`` takes the auxiliaries' pooled features (B, K-1, D) and returns a (B, K-1). The module is a
few hundred bytes per sample; under ``--compile`` Inductor fuses it into the step, so it has no kernel of its own.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FeatureFusionModule(nn.Module):
    def __init__(self, channels: int, num_inputs: int, reduction: int = 4, min_hidden: int = 32) -> None:
        super().__init__()
        hidden = max(channels // reduction, min_hidden)
        self.channels = channels
        self.num_inputs = num_inputs
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, num_inputs)

    def forward(self, pooled: Tensor) -> Tensor:
        """pooled (B, K-1, D) auxiliary features -> attention (B, K-1) over them (rows sum to 1)."""
        if pooled.dim() != 3 or pooled.shape[1] != self.num_inputs or pooled.shape[2] != self.channels:
            raise ValueError(
                f"FeatureFusionModule expects pooled features (B, {self.num_inputs}, {self.channels}), "
                f"got {tuple(pooled.shape)}"
            )
        hidden = torch.relu(self.bn(self.fc1(pooled.sum(dim=1))))
        return torch.softmax(self.fc2(hidden), dim=-1)
