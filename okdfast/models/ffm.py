"""The Feature Fusion Module (FFM) of MDE (Li et al., ACCV 2020): attention over the K branches computed from the
fused last-block features of all branches (ONE's gate computes it from the shared low-level features instead).

    s = GAP(sum_k F_k)                    (B, D)   fuse: the branches' last-block features, summed and pooled
    h = ReLU(BN(W1 s))                    (B, R)   R = max(D // reduction, min_hidden)
    a = softmax_k(W2 h + b2)              (B, K)   attention over the branches
    t = sum_k a_k z_k                     (B, C)   the ensemble teacher, from the branch logits z

The squeeze-and-excite shape (sum -> pool -> bottleneck FC -> softmax across branches) follows the selective-kernel
fusion that the same first author's later OKD work uses; the paper's text available to us confirms only the FFM's
inputs and purpose (METHOD.md section 3), so this layer layout is our reading, recorded in mde.py.

``forward(features, logits) -> (attention, teacher)``. With ``fused`` on (``--fused-ffm``; 'auto': where the
Triton kernels run, i.e. on CUDA) it runs the fused op ``okdfast.ops.ffm.ffm_attention`` (Triton: 2 launches
forward + 1 for the running statistics, 2 backward) and returns both in float32; otherwise the eager composition
of the submodules below, in the input dtype (so under autocast as before). Both use the same parameters and
buffers (same state_dict).
Under DDP with global-batch BatchNorm (``--sync-bn``, which replaces ``bn``) the eager path is taken.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from okdfast.ops.ffm import ffm_attention, fused_enabled

FUSED_MODES = ("auto", "on", "off")


class FeatureFusionModule(nn.Module):
    def __init__(
        self, channels: int, num_branches: int, reduction: int = 4, min_hidden: int = 32, fused: str = "auto"
    ) -> None:
        super().__init__()
        if fused not in FUSED_MODES:
            raise ValueError(f"fused={fused!r}: use 'auto', 'on' or 'off' (--fused-ffm)")
        hidden = max(channels // reduction, min_hidden)
        self.channels = channels
        self.num_branches = num_branches
        self.fused = fused
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, num_branches)

    def fuse(self, features: Tensor) -> Tensor:
        """(B, K, D, H, W) -> (B, D): global average pool of the sum over branches."""
        return features.sum(dim=1).mean(dim=(-2, -1))

    def attention(self, features: Tensor) -> Tensor:
        """Eager path: features (B, K, D, H, W) -> attention (B, K) over the branches (rows sum to 1)."""
        hidden = torch.relu(self.bn(self.fc1(self.fuse(features))))
        return torch.softmax(self.fc2(hidden), dim=-1)

    def forward(self, features: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """features (B, K, D, H, W), logits (B, K, C) -> attention (B, K), teacher t = sum_k a_k z_k (B, C)."""
        if features.dim() != 5 or features.shape[1] != self.num_branches or features.shape[2] != self.channels:
            raise ValueError(
                f"FeatureFusionModule expects features (B, {self.num_branches}, {self.channels}, H, W), "
                f"got {tuple(features.shape)}"
            )
        if logits.dim() != 3 or logits.shape[:2] != features.shape[:2]:
            raise ValueError(
                f"FeatureFusionModule expects logits (B, {self.num_branches}, C) with the features' B, "
                f"got {tuple(logits.shape)}"
            )
        if not self.uses_fused_op(features):
            attention = self.attention(features)
            return attention, torch.einsum("bk,bkc->bc", attention, logits)
        args, kwargs = self._fused_args()
        return ffm_attention(features, logits, *args, **kwargs)

    def uses_fused_op(self, features: Tensor) -> bool:
        """Whether forward runs the fused op. Not when the BatchNorm was converted for global-batch statistics
        (SyncBatchNorm / GlobalBatchNorm under DDP): the op computes the statistics of the local batch only."""
        return type(self.bn) is nn.BatchNorm1d and fused_enabled(self.fused, features)

    def _fused_args(self) -> tuple[tuple, dict]:
        """The parameters and the BatchNorm arguments exactly as ``nn.BatchNorm1d.forward`` derives them."""
        bn = self.bn
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        track = not bn.training or bn.track_running_stats
        args = (
            self.fc1.weight,
            bn.weight,
            bn.bias,
            self.fc2.weight,
            self.fc2.bias,
            bn.running_mean if track else None,
            bn.running_var if track else None,
        )
        return args, {"training": use_batch_stats, "momentum": momentum, "eps": bn.eps}
