"""``mde``: Online Knowledge Distillation via Multi-branch Diversity Enhancement. Zheng Li, Ying Huang, Defang
Chen, Tianren Luo, Ning Cai, Zhigeng Pan, ACCV 2020 (arXiv 2010.00795). No official code was released.

Shared trunk + K branches (ONE-style) + the Feature Fusion Module (FFM) + the Classifier Diversification (CD) loss:
    a = FFM(F_1..F_K)                                    (B, K)  attention from the fused last-block features
    t = sum_k a_k z_k                                    (B, C)  the ensemble teacher
    L = sum_k CE(z_k, y) + CE(t, y) + alpha * w(e) * sum_k T^2 KL(p^T(t) || p^T(z_k)) + lambda_CD * L_CD
    L_CD = mean over branch pairs k<l and classes c of cos(w_kc, w_lc)^2   (branch classifier weights W_k)

What is confirmed and what is our reading (METHOD.md section 3; search of the paper text on 2026-11-29):
- Confirmed (abstract, ACCV 2020 open-access page): the FFM integrates the last-block features of the branches
  to improve the attention that builds the ensemble; the CD loss strengthens the differences between branches;
  data sets CIFAR-10/100 and CINIC-10. The body of the paper (exact FFM layers, CD formula, lambda, tables) was
  not reachable with our tools.
- Our reading: FFM = sum-pool-bottleneck-softmax attention over branches (okdfast/models/ffm.py); CD = squared
  cosine similarity of the branches' per-class weight vectors (scale-free, in [0, 1]; third-party
  re-implementations use sum_{i<j} ||W_i^T W_j|| with lambda = 5e-8 or a mean |cos|); lambda_CD = --cd-weight.
- As in the OKDDip code's ONE (the code base this paper builds on), the teacher is not detached in the KL term by
  default; ``--detach-teacher`` detaches it.
"""

from __future__ import annotations

from torch import Tensor

from okdfast.methods.base import LossTerms, Method, MethodConfig, MethodOutput
from okdfast.methods.registry import register_method
from okdfast.models import MultiBranchNet
from okdfast.models.ffm import FeatureFusionModule
from okdfast.ops.classifier_diversity import classifier_diversity_loss
from okdfast.ops.dispatch import fused_enabled
from okdfast.ops.reference import classifier_diversity_loss_reference


@register_method
class MDE(Method):
    name = "mde"
    has_head = True
    head_name = "ffm"

    def __init__(self, arch: str, num_classes: int, config: MethodConfig) -> None:
        super().__init__(arch, num_classes, config)
        self.net = MultiBranchNet(arch, num_classes, num_branches=config.num_branches)
        self.ffm = FeatureFusionModule(self.net.feature_channels, config.num_branches, fused=config.fused_ffm)

    def forward(self, images: Tensor) -> MethodOutput:
        out = self.net(images)
        attention, teacher = self.ffm(out.features, out.logits)  # fused op on CUDA (--fused-ffm)
        return MethodOutput(out.logits, teacher=teacher, head=teacher, attention=attention)

    def loss(self, output: MethodOutput, target: Tensor, kd_scale: float) -> LossTerms:
        total, terms = self.online_kd(
            output.logits, target, output.teacher, kd_scale=kd_scale, detach_default=False, teacher_ce_weight=1.0
        )
        if self.config.cd_weight != 0.0:
            weights = self.net.classifier_weights()
            fused = fused_enabled(self.config.fused_loss, weights)
            cd = classifier_diversity_loss(weights) if fused else classifier_diversity_loss_reference(weights)
            total = total + self.config.cd_weight * cd
            terms["cd"] = cd.detach()
        return LossTerms(total, terms)
