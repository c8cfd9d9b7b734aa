"""The two pieces every backbone is cut into: a shared trunk and a factory of branches (docs/METHOD.md section 1).

An architecture file builds an :class:`ArchParts`: the trunk (stem + early stages, shared by the K branches in the
ONE-style network) and ``make_branch``, which returns a fresh, independently initialised :class:`Branch` (the last
stage(s) + global pool + classifier) on every call. :mod:`okdfast.models.multibranch` assembles them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class GlobalAvgPool(nn.Module):
    """(B, D, H, W) -> (B, D): mean over the spatial dims (any memory format, no reshape copy)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3))


class GlobalMaxPool(nn.Module):
    """(B, D, H, W) -> (B, D): max over the spatial dims (VGG's last 2x2 max-pool on a 2x2 map)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.amax((2, 3))


class Branch(nn.Module):
    """One branch: ``body`` (trunk output -> last-block features) then pool (+ head) + ``classifier``.

    ``forward(x)`` returns ``(pooled (B, D), logits (B, C))``: the pooled last-block feature s (what MDE's FFM and
    OKDDip's attention read, docs/METHOD.md section 3) and the branch logits. The (B, D, H, W) maps are never returned,
    so nothing downstream keeps them alive. ``classifier`` is always the final ``nn.Linear(D_head -> C)``; the CD
    loss reads ``classifier.weight``.
    """

    def __init__(
        self,
        body: nn.Module,
        classifier: nn.Linear,
        pool: nn.Module | None = None,
        head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.body = body
        self.pool = pool if pool is not None else GlobalAvgPool()
        self.head = head if head is not None else nn.Identity()  # extra layers between pool and classifier
        self.classifier = classifier

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.pool(self.body(x))
        return pooled, self.classifier(self.head(pooled))


@dataclass
class ArchParts:
    """A backbone cut into a shared trunk and a branch factory; shapes assume a (B, 3, 32, 32) input."""

    trunk: nn.Module  # (B, 3, 32, 32) -> (B, trunk_channels, Ht, Wt)
    make_branch: Callable[[], Branch]  # a fresh, independently initialised branch on every call
    trunk_channels: int  # channels of the trunk output (what ONE's gate pools)
    feature_channels: int  # D of a branch's last-block features
    feature_size: int  # H == W of the last-block features
    num_classes: int


def cat_branches(tensors: list[Tensor], num_branches: int = 1) -> Tensor:
    """``torch.cat(tensors, 1)`` branch by branch: each (B, K * C_i, H, W) holds K branches' C_i channels side by
    side, the result holds branch k's ``[t_0, t_1, ...]`` channels at ``[k * sum C_i, (k + 1) * sum C_i)``.

    ``num_branches = 1`` is the plain concat; K > 1 is a dense layer of the branch-batched form
    (okdfast/models/grouped.py). One cat of 2K narrowed views: the bytes of K separate concats, one launch, and the
    memory format (channels-last) of the inputs is kept.
    """
    if num_branches == 1:
        return torch.cat(tensors, 1)
    widths = [t.shape[1] // num_branches for t in tensors]
    return torch.cat([t.narrow(1, k * w, w) for k in range(num_branches) for t, w in zip(tensors, widths)], 1)


def init_weights(module: nn.Module, *, conv_mode: str = "fan_out", linear_std: float | None = None) -> nn.Module:
    """Kaiming-normal convs (``conv_mode``, ReLU gain, bias 0), BN weight 1 / bias 0 (docs/METHOD.md section 1).

    Linear layers keep torch's default init unless ``linear_std`` is given: then N(0, linear_std^2), bias 0
    (what the OKDDip VGG code does). Returns ``module`` for chaining.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=conv_mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
    return module


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
