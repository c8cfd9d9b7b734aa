"""The multi-branch network (docs/METHOD.md section 1): one shared trunk + K branches (ONE), or K whole networks (DML).

``MultiBranchNet(arch, num_classes, K)`` returns, for images (B, 3, 32, 32), a :class:`BranchOutput` with the
branch logits stacked once into (B, K, C), the pooled last-block features into (B, K, D) (what MDE's FFM and
OKDDip's attention read; pooling is linear, so the FFM's "sum of the maps, then pool" equals the sum of these),
and the shared trunk output (what ONE's gate pools) or None. No (B, K, D, H, W) stack of feature maps is built.
``K = 1`` with a shared trunk is the plain single network (baseline).

``branch_impl`` picks how the K branches run: ``'loop'`` (one branch module after another) or ``'grouped'`` (as one
network on branch-stacked channels, okdfast/models/grouped.py); ``'auto'`` picks per device type and arch by what
benchmarks/bench_branches.py measured. Both give the same outputs and gradients (to fp32 rounding) and the same
state_dict (the loop form's).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from okdfast.models.grouped import (
    expand_branches,
    group_modules,
    join_state,
    reads_shared_input,
    resolve_branch_impl,
    split_state,
)
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

    ``branch_impl``: 'loop' | 'grouped' | 'auto' (see the module docstring; 'auto' resolves for CUDA when it is
    available, else the CPU: pass 'loop' or 'grouped' to choose for another device). The resolved impl is
    ``self.branch_impl``. Grouped, ``branches`` (and ``trunks`` for DML) is one module on branch-stacked channels
    instead of a list of K, so read the classifier weights through :meth:`classifier_weights`; its parameters (and
    so an optimizer's state) are the grouped tensors, while ``state_dict`` and ``load_state_dict`` speak the loop form.
    """

    def __init__(
        self, arch: str, num_classes: int, num_branches: int, shared_trunk: bool = True, branch_impl: str = "loop"
    ) -> None:
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

        # Built in the loop form first either way, so that a seed gives the same initial weights under both impls.
        self.branch_impl = resolve_branch_impl(branch_impl, arch, num_branches=num_branches)
        self._expand_input = False  # grouped: copy the shared input K times before the first grouped block
        if self.branch_impl == "grouped":
            grouped_branches = group_modules(list(self.branches))
            if self.trunks is not None:
                self.trunks = group_modules(list(self.trunks))  # type: ignore[assignment]
            self.branches = grouped_branches  # type: ignore[assignment]
            self._expand_input = not reads_shared_input(self.trunks if self.trunks is not None else self.branches)
            self.register_state_dict_post_hook(_save_loop_form)
            self.register_load_state_dict_pre_hook(_load_loop_form)

    def forward(self, x: Tensor) -> BranchOutput:
        """images (B, 3, 32, 32) -> BranchOutput(logits (B, K, C), pooled (B, K, D), trunk or None)."""
        if self.branch_impl == "grouped":
            return self._forward_grouped(x)
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

    def _forward_grouped(self, x: Tensor) -> BranchOutput:
        k = self.num_branches
        shared = None
        if self.trunk is not None:
            shared = self.trunk(x)
            if self.trunk_grad_scale != 1.0:
                shared = _ScaleGrad.apply(shared, self.trunk_grad_scale)
            stacked_in = expand_branches(shared, k) if self._expand_input else shared
        else:
            stacked_in = self.trunks(expand_branches(x, k) if self._expand_input else x)
        pooled, logits = self.branches(stacked_in)  # (B, K * D), (B, K * C): branch k's at [k * D, (k + 1) * D)
        return BranchOutput(logits.unflatten(1, (k, -1)), pooled.unflatten(1, (k, -1)), shared)

    def classifier_weights(self, branches: slice | None = None) -> Tensor:
        """(K', C, D_head): the final ``classifier.weight`` of the branches in ``branches`` (all by default),
        stacked (differentiable, for the CD loss; MDE passes the auxiliary branches only)."""
        if self.branch_impl == "grouped":
            weight = self.branches.classifier.weight  # (K, C, D_head)
            return weight if branches is None else weight[branches]
        chosen = self.branches if branches is None else self.branches[branches]
        return torch.stack([branch.classifier.weight for branch in chosen])

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, num_branches={self.num_branches}, shared_trunk={self.shared_trunk}, "
            f"branch_impl={self.branch_impl!r}"
        )


def _grouped_children(net: MultiBranchNet) -> list[str]:
    return (["trunks"] if net.trunks is not None else []) + ["branches"]  # in the loop form's state_dict order


def _save_loop_form(net: MultiBranchNet, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook of a grouped net: write the loop form's entries (``branches.<k>.…``)."""
    for name in _grouped_children(net):
        split_state(state_dict, prefix + name, getattr(net, name), net.num_branches)


def _load_loop_form(net: MultiBranchNet, state_dict: dict, prefix: str, *args: object) -> None:
    """load_state_dict pre-hook of a grouped net: join the loop form's entries into the grouped tensors."""
    for name in _grouped_children(net):
        join_state(state_dict, prefix + name, getattr(net, name), net.num_branches)


def create_model(
    arch: str, num_classes: int, num_branches: int = 3, shared_trunk: bool = True, branch_impl: str = "loop"
) -> MultiBranchNet:
    """Build a :class:`MultiBranchNet`; ``num_branches=1`` (shared) is the single network."""
    return MultiBranchNet(arch, num_classes, num_branches, shared_trunk=shared_trunk, branch_impl=branch_impl)
