"""DenseNets for CIFAR (Huang et al. 2017) in trunk + branch form.

``densenet40_12`` (docs/METHOD.md; Huang et al.'s DenseNet (k = 12), depth 40, 1.0M parameters): conv3x3(3 -> 24),
three dense blocks of 12 layers (BN-ReLU-conv3x3(-> 12)), each block's input concatenated with every layer's
output; between blocks a transition BN-ReLU-conv1x1 (no compression)-avgpool 2x2. Widths: 24 -> 168 | 168 ->
312 | 312 -> 456.

Split (OKDDip ``densenet_one.py``): trunk = conv + block 1 + transition 1 + block 2 + transition 2,
(B, 3, 32, 32) -> (B, 312, 8, 8); each branch = block 3 + BN + ReLU + avgpool + fc(456 -> C); last-block
features (B, 456, 8, 8), taken after the final BN + ReLU (what is pooled).

``densenet40_12_bc`` is the OKDDip code's ``densenetd40k12``: DenseNet-BC layers (BN-ReLU-conv1x1(-> 48)-BN-ReLU-
conv3x3(-> 12)), 6 layers per block, compression 0.5: widths 24 -> 96 -> 48 | 48 -> 120 -> 60 | 60 -> 132;
trunk (B, 60, 8, 8), features (B, 132, 8, 8). (That code also assigns *one* block-3 module to every branch, so
its branches share block 3; here every branch gets its own, as docs/METHOD.md's multi-branch design intends.)

Convs are Kaiming-normal fan_out (docs/METHOD.md); the DenseNet reference code uses torch's default mode (fan_in):
set CONV_INIT_MODE to match it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from okdfast.models.parts import ArchParts, Branch, cat_branches, conv1x1, conv3x3, init_weights
from okdfast.models.registry import register_model

SHARED_BLOCKS = 2  # dense blocks 1..SHARED_BLOCKS (each with its transition) in the trunk; the rest per branch
INIT_CHANNELS = 24
CONV_INIT_MODE = "fan_out"
INPUT_SIZE = 32


class DenseLayer(nn.Module):
    """x -> cat([x, new], 1): new = conv3x3(relu(bn(x))) (basic) or through a 1x1 bottleneck of 4k (BC)."""

    def __init__(self, in_channels: int, growth: int, bottleneck: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        if bottleneck:
            self.conv1: nn.Module = conv1x1(in_channels, 4 * growth)
            self.bn2: nn.Module = nn.BatchNorm2d(4 * growth)
            self.relu2: nn.Module = nn.ReLU(inplace=True)
            self.conv2 = conv3x3(4 * growth, growth)
        else:
            self.conv1 = nn.Identity()
            self.bn2 = nn.Identity()
            self.relu2 = nn.Identity()
            self.conv2 = conv3x3(in_channels, growth)
        self.num_branches = 1  # K when K branches run as one (okdfast/models/grouped.py): the concat is per branch

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x), inplace=True)  # in place on BN's fresh output; x is concatenated below
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        # One concat per layer: the same bytes as torchvision's cat-of-all-previous, with no list to carry.
        return cat_branches([x, out], self.num_branches)


def _dense_block(in_channels: int, num_layers: int, growth: int, bottleneck: bool) -> nn.Sequential:
    return nn.Sequential(*(DenseLayer(in_channels + i * growth, growth, bottleneck) for i in range(num_layers)))


def _transition(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            bn=nn.BatchNorm2d(in_channels),
            relu=nn.ReLU(inplace=True),
            conv=conv1x1(in_channels, out_channels),
            pool=nn.AvgPool2d(kernel_size=2, stride=2),
        )
    )


def densenet_parts(
    layers_per_block: int,
    growth: int,
    num_classes: int,
    bottleneck: bool = False,
    compression: float = 1.0,
    num_blocks: int = 3,
) -> ArchParts:
    # in_channels[i]: channels entering dense block i+1; block_out[i]: leaving it (before its transition)
    in_channels, block_out = [INIT_CHANNELS], []
    for i in range(num_blocks):
        block_out.append(in_channels[i] + layers_per_block * growth)
        if i < num_blocks - 1:
            in_channels.append(int(block_out[i] * compression))

    def block_and_transition(i: int) -> list[tuple[str, nn.Module]]:
        mods: list[tuple[str, nn.Module]] = [
            (f"block{i + 1}", _dense_block(in_channels[i], layers_per_block, growth, bottleneck))
        ]
        if i < num_blocks - 1:
            mods.append((f"transition{i + 1}", _transition(block_out[i], in_channels[i + 1])))
        return mods

    trunk_layers: list[tuple[str, nn.Module]] = [("conv0", conv3x3(3, INIT_CHANNELS))]
    for i in range(SHARED_BLOCKS):
        trunk_layers += block_and_transition(i)
    trunk = init_weights(nn.Sequential(OrderedDict(trunk_layers)), conv_mode=CONV_INIT_MODE)

    feature_channels = block_out[-1]

    def make_branch() -> Branch:
        body_layers: list[tuple[str, nn.Module]] = []
        for i in range(SHARED_BLOCKS, num_blocks):
            body_layers += block_and_transition(i)
        body_layers += [("bn", nn.BatchNorm2d(feature_channels)), ("relu", nn.ReLU(inplace=True))]
        branch = Branch(nn.Sequential(OrderedDict(body_layers)), nn.Linear(feature_channels, num_classes))
        init_weights(branch, conv_mode=CONV_INIT_MODE)
        nn.init.zeros_(branch.classifier.bias)  # as the reference code does
        return branch

    return ArchParts(
        trunk=trunk,
        make_branch=make_branch,
        trunk_channels=in_channels[SHARED_BLOCKS],
        feature_channels=feature_channels,
        feature_size=INPUT_SIZE // 2 ** (num_blocks - 1),
        num_classes=num_classes,
    )


@register_model("densenet40_12")
def densenet40_12(num_classes: int) -> ArchParts:
    """DenseNet-40 (k = 12), no bottleneck, no compression; features (B, 456, 8, 8)."""
    return densenet_parts(12, 12, num_classes)


@register_model("densenet40_12_bc")
def densenet40_12_bc(num_classes: int) -> ArchParts:
    """The OKDDip code's densenetd40k12: BC layers, 6 per block, compression 0.5; features (B, 132, 8, 8)."""
    return densenet_parts(6, 12, num_classes, bottleneck=True, compression=0.5)
