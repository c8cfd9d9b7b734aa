"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016) in trunk + branch form.

``wrn20_8`` (docs/METHOD.md section 1): stem conv3x3(3 -> 16), three stages of 3 pre-activation wide basic blocks
(BN-ReLU-conv3x3-[dropout]-BN-ReLU-conv3x3 + shortcut) of widths 16*8 / 32*8 / 64*8, strides 1 / 2 / 2, then a
final BN + ReLU, global average pool and fc(512 -> C). Where the shape changes the shortcut is a 1x1 conv applied
to the pre-activated input (as in the WRN reference code). Depth 20 counts the stem, the 18 block convs and fc.

Split (ONE): trunk = stem + stages 1-2, (B, 3, 32, 32) -> (B, 256, 16, 16); each branch = stage 3 + final
BN + ReLU + pool + fc; last-block features (B, 512, 8, 8), taken after the final BN + ReLU (what is pooled).

``wrn20_8_bottleneck`` is what the OKDDip code calls ``wide_resnet20_8``: ``ResNet(Bottleneck, [2, 2, 2],
width_per_group=64*8)``, i.e. post-activation bottlenecks with inner widths 128 / 256 / 512 and outputs
64 / 128 / 256 (features (B, 256, 8, 8)), option-B shortcuts.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from okdfast.models.parts import ArchParts, Branch, conv1x1, conv3x3, init_weights
from okdfast.models.registry import register_model
from okdfast.models.resnet import Bottleneck, cifar_resnet_parts

SHARED_STAGES = 2  # stages 1..SHARED_STAGES in the shared trunk; the rest (+ final BN-ReLU) in every branch
STAGE_WIDTHS = (16, 32, 64)  # times the widening factor k
STAGE_STRIDES = (1, 2, 2)
STEM_CHANNELS = 16
INPUT_SIZE = 32


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block: out = conv(relu(bn(conv(relu(bn(x)))))) + shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.equal_in_out = stride == 1 and in_channels == out_channels
        self.shortcut = nn.Identity() if self.equal_in_out else conv1x1(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        o1 = F.relu(self.bn1(x), inplace=True)  # in place on BN's fresh output; x itself is never written
        out = F.relu(self.bn2(self.conv1(o1)), inplace=True)
        out = self.conv2(self.dropout(out))
        # Where the shape changes the projection reads the pre-activated input, as in the WRN reference code.
        return out + (x if self.equal_in_out else self.shortcut(o1))


def wide_resnet_parts(blocks_per_stage: int, widen_factor: int, num_classes: int, drop_rate: float = 0.0) -> ArchParts:
    widths = [STEM_CHANNELS] + [w * widen_factor for w in STAGE_WIDTHS]  # widths[i]: input channels of stage i+1

    def stage(i: int) -> nn.Sequential:
        blocks = [
            WideBasicBlock(
                widths[i] if j == 0 else widths[i + 1], widths[i + 1], STAGE_STRIDES[i] if j == 0 else 1, drop_rate
            )
            for j in range(blocks_per_stage)
        ]
        return nn.Sequential(*blocks)

    trunk_layers: OrderedDict[str, nn.Module] = OrderedDict(conv1=conv3x3(3, STEM_CHANNELS))
    for i in range(SHARED_STAGES):
        trunk_layers[f"layer{i + 1}"] = stage(i)
    trunk = init_weights(nn.Sequential(trunk_layers))

    feature_channels = widths[-1]

    def make_branch() -> Branch:
        body: OrderedDict[str, nn.Module] = OrderedDict(
            (f"layer{i + 1}", stage(i)) for i in range(SHARED_STAGES, len(STAGE_WIDTHS))
        )
        body["bn"] = nn.BatchNorm2d(feature_channels)
        body["relu"] = nn.ReLU(inplace=True)
        return init_weights(Branch(nn.Sequential(body), nn.Linear(feature_channels, num_classes)))

    return ArchParts(
        trunk=trunk,
        make_branch=make_branch,
        trunk_channels=widths[SHARED_STAGES],
        feature_channels=feature_channels,
        feature_size=INPUT_SIZE // math.prod(STAGE_STRIDES),
        num_classes=num_classes,
    )


@register_model("wrn20_8")
def wrn20_8(num_classes: int) -> ArchParts:
    """WRN-20-8: 3 pre-activation wide basic blocks per stage, widths 128 / 256 / 512, dropout 0."""
    return wide_resnet_parts(3, 8, num_classes)


@register_model("wrn20_8_bottleneck")
def wrn20_8_bottleneck(num_classes: int) -> ArchParts:
    """The OKDDip code's wide_resnet20_8: Bottleneck x [2, 2, 2], inner width x8, features (B, 256, 8, 8)."""
    return cifar_resnet_parts(Bottleneck, 2, num_classes, width_mult=8)
