"""The multi-branch network (METHOD.md section 1): one shared trunk + K branches (ONE), or K whole networks (DML).

``MultiBranchNet(arch, num_classes, K)`` returns, for images (B, 3, 32, 32), a :class:`BranchOutput` with the
branch logits stacked once into (B, K, C), the pooled last-block features into (B, K, D) (what MDE's FFM and
OKDDip's attention read; pooling is linear, so the FFM's "sum of the maps, then pool" equals the sum of these),
and the shared trunk output (what ONE's gate pools) or None. No (B, K, D, H, W) stack of feature maps is built.
``K = 1`` with a shared trunk is the plain single network (baseline).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from okdfast.models.registry import create_arch

MAX_BRANCHES = 8


class BranchOutput(NamedTuple):
    logits: Tensor  # (B, K, C)
    pooled: Tensor  # (B, K, D) pooled last-block features of every branch (the input of its classifier head)
    trunk: Tensor | None  # (B, Ct, Ht, Wt) shared trunk output; None when not shared (DML)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``scale`` (CL-ILR's backprop rescaling, scale = 1/K)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class MultiBranchNet(nn.Module):
    """K branches of the backbone ``arch``: on a shared trunk (``shared_trunk=True``) or each with its own trunk.

    ``trunk_grad_scale`` (default 1.0) multiplies the gradient flowing from the branches, and from whatever reads
    ``BranchOutput.trunk`` (ONE's gate), back into the shared trunk; CL-ILR sets it to 1/K. The scaled point is the
    one the OKDDip code uses (its ``ILR`` sits on the trunk output, before the branches and the gate).
    """

    def __init__(self, arch: str, num_classes: int, num_branches: int, shared_trunk: bool = True) -> None:
        super().__init__()
        if isinstance(num_branches, bool) or not isinstance(num_branches, int) or not 1 <= num_branches <= MAX_BRANCHES:
            raise ValueError(
                f"num_branches={num_branches!r}: must be an int in 1..{MAX_BRANCHES} (1 is the single network)"
            )
        parts = create_arch(arch, num_classes)
        self.arch = arch
        self.shared_trunk = shared_trunk
        self.num_branches = num_branches
        self.num_classes = num_classes
        self.trunk_channels = parts.trunk_channels
        self.feature_channels = parts.feature_channels
        self.feature_size = parts.feature_size
        self.trunk_grad_scale = 1.0

        self.trunk: nn.Module | None
        self.trunks: nn.ModuleList | None
        if shared_trunk:
            self.trunk, self.trunks = parts.trunk, None
            self.branches = nn.ModuleList(parts.make_branch() for _ in range(num_branches))
        else:
            # K whole networks: each gets a freshly built (and freshly initialised) trunk and branch.
            all_parts = [parts] + [create_arch(arch, num_classes) for _ in range(num_branches - 1)]
            self.trunk = None
            self.trunks = nn.ModuleList(p.trunk for p in all_parts)
            self.branches = nn.ModuleList(p.make_branch() for p in all_parts)

    def forward(self, x: Tensor) -> BranchOutput:
        """images (B, 3, 32, 32) -> BranchOutput(logits (B, K, C), pooled (B, K, D), trunk or None)."""
        if self.trunk is not None:
            shared = self.trunk(x)
            if self.trunk_grad_scale != 1.0:
                shared = _ScaleGrad.apply(shared, self.trunk_grad_scale)
            outs = [branch(shared) for branch in self.branches]
        else:
            shared = None
            outs = [branch(trunk(x)) for trunk, branch in zip(self.trunks, self.branches)]
        pooled = torch.stack([s for s, _ in outs], dim=1)
        logits = torch.stack([z for _, z in outs], dim=1)
        return BranchOutput(logits, pooled, shared)

    def classifier_weights(self, branches: slice | None = None) -> Tensor:
        """(K', C, D_head): the final ``classifier.weight`` of the branches in ``branches`` (all by default),
        stacked (differentiable, for the CD loss; MDE passes the auxiliary branches only)."""
        chosen = self.branches if branches is None else self.branches[branches]
        return torch.stack([branch.classifier.weight for branch in chosen])

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_branches={self.num_branches}, shared_trunk={self.shared_trunk}"


def create_model(arch: str, num_classes: int, num_branches: int = 3, shared_trunk: bool = True) -> MultiBranchNet:
    """Build a :class:`MultiBranchNet`; ``num_branches=1`` (shared) is the single network."""
    return MultiBranchNet(arch, num_classes, num_branches, shared_trunk=shared_trunk)
