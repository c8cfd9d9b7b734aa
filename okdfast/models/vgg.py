"""VGG-16 with BN for CIFAR (Simonyan & Zisserman 2015; CIFAR form of the ONE / OKDDip code) in trunk + branch form.

Five conv stages ``[64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M]``, each conv
3x3 with bias + BN + ReLU, each stage closed by a 2x2 max-pool; 32x32 input -> 512 x 1 x 1.

Split (OKDDip ``vgg_one.py``): trunk = stages 1-4, (B, 3, 32, 32) -> (B, 512, 2, 2); each branch = the three
512 convs of stage 5 + the final max-pool + head. The branch's last-block features are the last conv's output
before that max-pool, (B, 512, 2, 2); ``Branch.classify`` max-pools them (global max over the 2x2 map).

Heads: ``vgg16`` has a single fc(512 -> C) (docs/METHOD.md). ``vgg16_mlp`` has the OKDDip code's head, fc(512 -> 512)
-ReLU-Dropout-fc(512 -> 512)-ReLU-Dropout-fc(512 -> C); ``Branch.classifier`` is its last fc.
Init as in that code: Kaiming-normal fan_out convs with bias 0, Linear N(0, 0.01^2) with bias 0.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from okdfast.models.parts import ArchParts, Branch, GlobalMaxPool, conv3x3, init_weights
from okdfast.models.registry import register_model

VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
SHARED_STAGES = 4  # stages 1..SHARED_STAGES in the shared trunk; the rest in every branch
LINEAR_STD = 0.01
INPUT_SIZE = 32


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [conv3x3(in_channels, out_channels, bias=True), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def vgg_parts(stages: tuple[tuple[int, ...], ...], num_classes: int, mlp_head: bool = False) -> ArchParts:
    in_channels = [3] + [widths[-1] for widths in stages]  # in_channels[i]: input channels of stage i+1

    def stage(i: int, pool: bool) -> list[nn.Module]:
        layers, c = [], in_channels[i]
        for w in stages[i]:
            layers += _conv_bn_relu(c, w)
            c = w
        return layers + ([nn.MaxPool2d(kernel_size=2, stride=2)] if pool else [])

    trunk = nn.Sequential(OrderedDict((f"stage{i + 1}", nn.Sequential(*stage(i, True))) for i in range(SHARED_STAGES)))
    init_weights(trunk, linear_std=LINEAR_STD)

    feature_channels = in_channels[-1]
    last = len(stages) - 1

    def make_branch() -> Branch:
        # The last stage's max-pool is left to Branch.classify so that the features are the pre-pool conv output.
        body = nn.Sequential(
            OrderedDict((f"stage{i + 1}", nn.Sequential(*stage(i, i != last))) for i in range(SHARED_STAGES, last + 1))
        )
        head = None
        if mlp_head:
            head = nn.Sequential(
                nn.Linear(feature_channels, 512),
                nn.ReLU(inplace=True),
                nn.Dropout(),
                nn.Linear(512, 512),
                nn.ReLU(inplace=True),
                nn.Dropout(),
            )
        classifier = nn.Linear(512 if mlp_head else feature_channels, num_classes)
        return init_weights(Branch(body, classifier, pool=GlobalMaxPool(), head=head), linear_std=LINEAR_STD)

    return ArchParts(
        trunk=trunk,
        make_branch=make_branch,
        trunk_channels=in_channels[SHARED_STAGES],
        feature_channels=feature_channels,
        feature_size=INPUT_SIZE // 2 ** (len(stages) - 1),  # every stage but the last halves the map
        num_classes=num_classes,
    )


@register_model("vgg16")
def vgg16(num_classes: int) -> ArchParts:
    """VGG-16-BN, single fc(512 -> C) head; features (B, 512, 2, 2)."""
    return vgg_parts(VGG16_STAGES, num_classes)


@register_model("vgg16_mlp")
def vgg16_mlp(num_classes: int) -> ArchParts:
    """VGG-16-BN with the OKDDip code's 3-layer head (512-512-C, dropout 0.5); features (B, 512, 2, 2)."""
    return vgg_parts(VGG16_STAGES, num_classes, mlp_head=True)
