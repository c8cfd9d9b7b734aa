"""What OKDDip and MDE share: K-1 auxiliary branches and one group leader on a shared trunk, two-level distillation.

    first level:   auxiliary branch i distils from its target t_i = sum_j A_ij z_j (a mix of the auxiliaries)
    second level:  the leader z_L distils from the mean of the auxiliaries, (1/(K-1)) sum_i z_i

Both levels are one (B, K, K) matrix of teacher weights over the branches (rows 0..K-2: the auxiliaries' A with a
zero leader column; row K-1: the uniform mean of the auxiliaries), so the whole CE + KL part of either method is
one call of the fused op. The leader is the last branch, and what a results table reports as the method's model
(the OKDDip code reports and checkpoints its leader).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from okdfast.methods.base import Method, MethodConfig, MethodOutput


class TwoLevelMethod(Method):
    head_name = "leader"
    default_branches = 4  # 3 auxiliaries + 1 leader, the OKDDip default
    min_branches = 3  # at least two auxiliaries to mix, plus the leader

    def __init__(self, arch: str, num_classes: int, config: MethodConfig) -> None:
        super().__init__(arch, num_classes, config)
        self.aux_branches = config.num_branches - 1
        self.net = self.build_net()
        # float64, cast where it is used: 1/(K-1) exact in float64 runs, correctly rounded in float32 ones
        leader_row = torch.full((1, 1, self.aux_branches), 1.0 / self.aux_branches, dtype=torch.float64)
        self.register_buffer("leader_row", F.pad(leader_row, (0, 1)), persistent=False)  # (1, 1, K)

    def teacher_weights(self, aux_rows: Tensor) -> Tensor:
        """aux_rows (B, K-1, K-1) (or (B, 1, K-1): one target shared by the auxiliaries) -> W (B, K, K)."""
        batch = aux_rows.shape[0]
        aux = F.pad(aux_rows, (0, 1)).expand(batch, self.aux_branches, self.aux_branches + 1)
        return torch.cat([aux, self.leader_row.to(aux.dtype).expand(batch, 1, -1)], dim=1)

    def heads(self, output: MethodOutput) -> dict[str, Tensor]:
        logits = output.logits
        return {"leader": logits[:, -1], "aux_ensemble": logits[:, :-1].mean(dim=1)}
