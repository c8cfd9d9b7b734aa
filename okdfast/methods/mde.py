"""``mde``: Online Knowledge Distillation via Multi-branch Diversity Enhancement. Zheng Li, Ying Huang, Defang
Chen, Tianren Luo, Ning Cai, Zhigeng Pan, ACCV 2020 (arXiv 2010.00795). No official code was released.
The spec is docs/METHOD.md section 3, which separates what the paper's own framework figure shows from our reading.

From the paper's figure: OKDDip's two-level layout (a shared trunk, K-1 auxiliary branches and one group leader,
``--branches K``, default 4); the Feature Fusion Module takes every auxiliary branch's pooled feature s_i and its
logits t_i and makes one target that every auxiliary distils from (L_kl1^i); the auxiliaries' ensemble distils
into the leader (L_kl2); the CD loss acts on pairs of auxiliary classifiers' weights, never the leader's:

    a = FFM(s_1 .. s_{K-1})                               (B, K-1)  okdfast/models/ffm.py
    target = sum_i a_i t_i                                (B, C)
    L = sum_k CE(z_k, y) + target_ce * CE(target, y)
        + alpha * w(e) * [sum_i T^2 KL(p^T(target) || p^T(t_i)) + T^2 KL(p^T(mean_i t_i) || p^T(z_leader))]
        + lambda_CD * CD(W_1 .. W_{K-1})

Our reading, each switchable (docs/METHOD.md, "our reading"):
- FFM layers: fuse = sum_i s_i, FC(D -> R) -> BN -> ReLU -> FC(R -> K-1) -> softmax over the auxiliaries,
  R = max(D/4, 32). ``--ffm off``: target = the mean of the auxiliaries (an ablation).
- The target's own CE term, ``--target-ce`` (default 1.0, as ONE's gate ensemble has; the figure does not show it).
- KL forms and T^2 scaling as in the OKDDip code; the target is not detached (the FFM learns through L_kl1, as
  OKDDip's attention does). The leader's target (the auxiliaries' mean) is detached, so L_kl2 trains only the
  leader, as the figure draws it (distillation into the leader); OKDDip's code does not detach it
  (``--no-detach-leader-target`` gives that). ``--detach-teacher`` detaches both levels (then the FFM learns
  from CE(target, y) alone).
- CD form (``--cd-form``): frobenius sum_{i<j} ||W_i^T W_j||_F (default, lambda 5e-8 as both third-party
  re-implementations use), abscos (mean |cos|), cos2 (mean cos^2); ``--cd-weight`` sets lambda (0: off).
The whole CE + KL part is one call of the fused op: the two levels are one (B, K, K) matrix of teacher weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from okdfast.methods.base import LossTerms, MethodConfig, MethodOutput
from okdfast.methods.registry import register_method
from okdfast.methods.two_level import TwoLevelMethod
from okdfast.models.ffm import FeatureFusionModule
from okdfast.ops.classifier_diversity import classifier_diversity_loss


@register_method
class MDE(TwoLevelMethod):
    name = "mde"
    layout_version = 2
    layout_change = (
        "MDE now has K-1 auxiliary branches and a group leader, the FFM reads the auxiliaries' pooled features and "
        "CD acts on the auxiliary classifiers only (docs/METHOD.md section 3); layout 1 put all K branches under "
        "the FFM"
    )

    def __init__(self, arch: str, num_classes: int, config: MethodConfig) -> None:
        super().__init__(arch, num_classes, config)
        self.ffm = FeatureFusionModule(self.net.feature_channels, self.aux_branches) if config.ffm else None
        if self.ffm is None:
            uniform = torch.full((1, 1, self.aux_branches), 1.0 / self.aux_branches)
            self.register_buffer("uniform_target", uniform, persistent=False)

    def forward(self, images: Tensor) -> MethodOutput:
        out = self.net(images)
        if self.ffm is None:
            attention = self.uniform_target.expand(out.logits.shape[0], 1, -1)
        else:
            attention = self.ffm(out.pooled[:, :-1]).unsqueeze(1)  # (B, 1, K-1): one target for every auxiliary
        return MethodOutput(out.logits, teacher_weights=self.teacher_weights(attention), attention=attention[:, 0])

    def loss(self, output: MethodOutput, target: Tensor, kd_weight: Tensor | float) -> LossTerms:
        # rows 0..K-2 of the teacher are the one target: its CE once (row 0); row K-1 is the leader's target
        leader_row = self.config.num_branches - 1
        total, terms = self.online_kd(
            output,
            target,
            kd_weight,
            detach_default=False,
            teacher_ce_weight=self.config.target_ce,
            teacher_ce_rows=(0,),
            detached_teacher_rows=(leader_row,) if self.config.detach_leader_target else None,
        )
        cd_weight = self.config.resolved_cd_weight
        if cd_weight != 0.0:
            cd = classifier_diversity_loss(self.net.classifier_weights(slice(0, -1)), self.config.cd_form)
            total = total + cd_weight * cd
            terms["cd"] = cd.detach()
        return LossTerms(total, terms)

    def heads(self, output: MethodOutput) -> dict[str, Tensor]:
        logits = output.logits
        weights = output.attention.to(logits.dtype)  # (B, K-1)
        return super().heads(output) | {"target": torch.einsum("bi,bic->bc", weights, logits[:, :-1])}
