"""The Feature Fusion Module (FFM) of MDE (Li et al., ACCV 2020; docs/METHOD.md section 3).

The paper's figure fixes the FFM's inputs and output: from every auxiliary branch i its feature s_i (the pooled
last-block feature that enters the branch's FC) and its logits t_i go in, one target comes out. The layers in
between are our reading (docs/METHOD.md, "our reading"), with the input as a choice (``inputs``):

    x = sum_i s_i | [s_1, .., s_M] | [.., t_1, .., t_M]    the fused input (``FFM_INPUTS``; logits detached)
    h = ReLU(BN(W1 x))                    (B, R)           R = max(D // reduction, min_hidden)
    e = W2 h + b2                         (B, M) | (B, M, M)   attention logits over the M auxiliaries

``forward(pooled, logits)`` returns the attention logits ``e``: the attention softmax a = softmax(e / tau), the
target sum_i a_i t_i and its losses are formed by MDE's loss head (``okdfast.ops.mde_head``, one fused pass), so
that the softmax's temperature and its gradient live in one place. ``per_auxiliary=True`` gives each auxiliary its
own target (OKDDip's form, (B, M, M)); otherwise one target is shared by all of them (B, M). The logits enter
detached: the FFM reads them as evidence of which auxiliary to trust, it does not train the branches through them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

FFM_INPUTS = ("sum", "concat", "sum+logits", "concat+logits", "logits")


class FeatureFusionModule(nn.Module):
    """MDE's Feature Fusion Module (docs/METHOD.md section 3): from the M auxiliary branches' pooled features
    (B, M, D) (and their logits (B, M, C) when ``inputs`` names them), FC(width -> R, no bias) -> BatchNorm1d ->
    ReLU -> FC(R -> M), R = max(D / reduction, min_hidden): the attention logits (B, M), or (B, M, M) with
    ``per_auxiliary`` (one attention row per auxiliary). Feed them to ``okdfast.functional.mde_head_loss``, which
    applies the attention softmax and builds the targets; the FFM learns through that loss's gradient.

    ``inputs``: ``sum`` (the features summed, default), ``concat``, ``sum+logits``, ``concat+logits`` or ``logits``
    (the logits are read detached: the FFM weighs the auxiliaries, it does not train them).
    """

    def __init__(
        self,
        channels: int,
        num_inputs: int,
        num_classes: int | None = None,
        *,
        inputs: str = "sum",
        per_auxiliary: bool = False,
        reduction: int = 4,
        min_hidden: int = 32,
    ) -> None:
        super().__init__()
        if inputs not in FFM_INPUTS:
            raise ValueError(f"inputs={inputs!r}: use one of {', '.join(FFM_INPUTS)}")
        if "logits" in inputs and not num_classes:
            raise ValueError(f"inputs={inputs!r} reads the auxiliaries' logits: pass num_classes")
        width = {"sum": channels, "concat": num_inputs * channels, "logits": 0}[inputs.split("+")[0]]
        if "logits" in inputs:
            width += num_inputs * num_classes
        hidden = max(channels // reduction, min_hidden)
        self.channels = channels
        self.num_inputs = num_inputs
        self.num_classes = num_classes
        self.inputs = inputs
        self.per_auxiliary = per_auxiliary
        self.fc1 = nn.Linear(width, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, num_inputs * num_inputs if per_auxiliary else num_inputs)

    def fused_input(self, pooled: Tensor, logits: Tensor | None) -> Tensor:
        """(B, width): the features summed or concatenated, then the detached logits when ``inputs`` names them."""
        features = self.inputs.split("+")[0]
        parts = []
        if features == "sum":
            parts.append(pooled.sum(dim=1))
        elif features == "concat":
            parts.append(pooled.flatten(1))
        if "logits" in self.inputs:
            parts.append(logits.detach().flatten(1).to(pooled.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def forward(self, pooled: Tensor, logits: Tensor | None = None) -> Tensor:
        """pooled (B, M, D) auxiliary features, logits (B, M, C) their logits (read when ``inputs`` names them) ->
        attention logits (B, M), or (B, M, M) with ``per_auxiliary``."""
        if pooled.dim() != 3 or pooled.shape[1] != self.num_inputs or pooled.shape[2] != self.channels:
            raise ValueError(
                f"FeatureFusionModule expects pooled features (B, {self.num_inputs}, {self.channels}), "
                f"got {tuple(pooled.shape)}"
            )
        if "logits" in self.inputs and (logits is None or logits.shape[1:] != (self.num_inputs, self.num_classes)):
            got = None if logits is None else tuple(logits.shape)
            raise ValueError(
                f"FeatureFusionModule(inputs={self.inputs!r}) expects logits (B, {self.num_inputs}, "
                f"{self.num_classes}), got {got}"
            )
        energy = self.fc2(self.bn(self.fc1(self.fused_input(pooled, logits))).relu())
        return energy.view(-1, self.num_inputs, self.num_inputs) if self.per_auxiliary else energy
