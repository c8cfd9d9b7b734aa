"""CIFAR ResNets (He et al. 2016, section 4.2) in trunk + branch form, as the ONE / OKDDip code builds them.

Stem conv3x3(3 -> 16) + BN + ReLU, then three stages of n blocks with widths 16 / 32 / 64 (times the block's
expansion), strides 1 / 2 / 2; global average pool; fc. ResNet-(6n+2) uses BasicBlock. Where the shape changes
the shortcut is a 1x1 conv + BN ("option B", as in the OKDDip ``resnet_one.py``); He et al.'s parameter counts
are for option A (zero-padding, no parameters), so option B adds 2,752 parameters to every ResNet-(6n+2).

Split (ONE): the trunk is the stem + stages 1-2, (B, 3, 32, 32) -> (B, 32, 16, 16); each branch is stage 3 +
pool + fc(64 -> C), with last-block features (B, 64, 8, 8).

``resnet110`` is the BasicBlock ResNet-110 of docs/METHOD.md (n = 18, He et al.). The OKDDip / ONE code's
``resnet110`` is instead ``ResNet(Bottleneck, [12, 12, 12])`` (9n+2 = 110 layers, stage widths 64 / 128 / 256
after expansion, last-block features (B, 256, 8, 8)); it is registered as ``resnet110_bottleneck``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from okdfast.models.parts import ArchParts, Branch, conv1x1, conv3x3, init_weights
from okdfast.models.registry import register_model

SHARED_STAGES = 2  # stages 1..SHARED_STAGES in the shared trunk, the rest in every branch (ONE: 2 of 3; 0..2)
STAGE_PLANES = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)
STEM_CHANNELS = 16
INPUT_SIZE = 32  # CIFAR


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity, or option B (1x1 conv + BN) where the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(OrderedDict(conv=conv1x1(in_channels, out_channels, stride), bn=nn.BatchNorm2d(out_channels)))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU. ``planes`` out channels."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, width_mult: int = 1) -> None:
        super().__init__()
        if width_mult != 1:
            raise ValueError(f"width_mult={width_mult}: BasicBlock has no inner width; use Bottleneck")
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_channels, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)  # in place: BN's backward does not need its output
        return F.relu(out, inplace=True)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN + shortcut, ReLU. ``4 * planes`` out channels.

    The inner width is ``planes * width_mult`` (torchvision's ``width_per_group / 64``; OKDDip's wide_resnet20_8
    uses width_mult 8).
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, width_mult: int = 1) -> None:
        super().__init__()
        width = planes * width_mult
        out_channels = planes * self.expansion
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        out += self.shortcut(x)
        return F.relu(out, inplace=True)


def _stage(
    block: type[nn.Module], in_channels: int, planes: int, num_blocks: int, stride: int, width_mult: int
) -> nn.Sequential:
    """``num_blocks`` blocks, the first with ``stride`` (and the projection shortcut where needed)."""
    layers = []
    for i in range(num_blocks):
        layers.append(block(in_channels, planes, stride if i == 0 else 1, width_mult))
        in_channels = planes * block.expansion
    return nn.Sequential(*layers)


def cifar_resnet_parts(
    block: type[nn.Module], blocks_per_stage: int, num_classes: int, width_mult: int = 1
) -> ArchParts:
    """A CIFAR ResNet with ``blocks_per_stage`` blocks in each of the 3 stages, split at ``SHARED_STAGES``."""
    channels = [STEM_CHANNELS]  # channels[i]: input channels of stage i+1
    for planes in STAGE_PLANES:
        channels.append(planes * block.expansion)

    def stage(i: int) -> nn.Sequential:
        return _stage(block, channels[i], STAGE_PLANES[i], blocks_per_stage, STAGE_STRIDES[i], width_mult)

    trunk_layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=conv3x3(3, STEM_CHANNELS), bn1=nn.BatchNorm2d(STEM_CHANNELS), relu=nn.ReLU(inplace=True)
    )
    for i in range(SHARED_STAGES):
        trunk_layers[f"layer{i + 1}"] = stage(i)
    trunk = init_weights(nn.Sequential(trunk_layers))

    feature_channels = channels[-1]

    def make_branch() -> Branch:
        body = nn.Sequential(OrderedDict((f"layer{i + 1}", stage(i)) for i in range(SHARED_STAGES, len(STAGE_PLANES))))
        return init_weights(Branch(body, nn.Linear(feature_channels, num_classes)))

    return ArchParts(
        trunk=trunk,
        make_branch=make_branch,
        trunk_channels=channels[SHARED_STAGES],
        feature_channels=feature_channels,
        feature_size=INPUT_SIZE // math.prod(STAGE_STRIDES),
        num_classes=num_classes,
    )


@register_model("resnet8")
def resnet8(num_classes: int) -> ArchParts:
    """ResNet-8 (n = 1): a tiny network for tests."""
    return cifar_resnet_parts(BasicBlock, 1, num_classes)


@register_model("resnet20")
def resnet20(num_classes: int) -> ArchParts:
    return cifar_resnet_parts(BasicBlock, 3, num_classes)


@register_model("resnet32")
def resnet32(num_classes: int) -> ArchParts:
    return cifar_resnet_parts(BasicBlock, 5, num_classes)


@register_model("resnet56")
def resnet56(num_classes: int) -> ArchParts:
    return cifar_resnet_parts(BasicBlock, 9, num_classes)


@register_model("resnet110")
def resnet110(num_classes: int) -> ArchParts:
    """BasicBlock ResNet-110 (n = 18), as docs/METHOD.md section 1 and He et al. define it."""
    return cifar_resnet_parts(BasicBlock, 18, num_classes)


@register_model("resnet110_bottleneck")
def resnet110_bottleneck(num_classes: int) -> ArchParts:
    """ResNet-110 as the OKDDip / ONE code builds it: Bottleneck, 12 blocks per stage, features (B, 256, 8, 8)."""
    return cifar_resnet_parts(Bottleneck, 12, num_classes)
