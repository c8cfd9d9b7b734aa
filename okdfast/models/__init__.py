"""CIFAR backbones cut into a shared trunk + branches, their registry, and the multi-branch network.

>>> from okdfast.models import create_model, list_models
>>> net = create_model("resnet32", num_classes=100, num_branches=3)  # ONE-style: shared trunk + 3 branches
>>> out = net(images)  # logits (B, 3, 100), pooled (B, 3, 64), trunk (B, 32, 16, 16)
"""

# The backbone modules register themselves on import.
from okdfast.models import densenet, resnet, vgg, wide_resnet  # noqa: F401
from okdfast.models.ffm import FFM_INPUTS, FeatureFusionModule
from okdfast.models.multibranch import BranchOutput, MultiBranchNet, create_model
from okdfast.models.parts import ArchParts, Branch, GlobalAvgPool, GlobalMaxPool, init_weights
from okdfast.models.registry import create_arch, list_models, register_model

__all__ = [
    "ArchParts",
    "Branch",
    "BranchOutput",
    "FFM_INPUTS",
    "FeatureFusionModule",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "MultiBranchNet",
    "create_arch",
    "create_model",
    "init_weights",
    "list_models",
    "register_model",
]
