"""The eager reference trainer of bench_train.py: online KD written the way researchers write it today.

Faithful to the public OKD code bases (OKDDip's train_one.py / train_GL.py, ONE's cifar_one.py), not a straw man:
fp32, NCHW, a torch DataLoader over a Dataset of per-image torchvision transforms with worker processes and pinned
memory, SGD (Nesterov) stepping the whole model, and the loss as a Python loop over branches with OKDDip's KL_Loss.
The network is okdfast's own MDE module, built eager and plain (``branch_impl='loop'``, ``fused_loss='off'``: no
okdfast speed feature can enter through a default), so both sides train the same architecture; only the way it
is fed and driven differs. The loss is MDE's (okdfast/methods/mde.py, docs/METHOD.md section 3) written out:

    target = sum_i a_i t_i                     the FFM target of the K-1 auxiliaries t_i, a = the FFM attention
    L = sum_k CE(z_k, y) + target_ce * CE(target, y)
        + w * [sum_i T^2 KL(p(target) || p(t_i)) + T^2 KL(p(mean_i t_i) || p(z_leader))]   (leader target detached)
        + lambda_CD * CD, with MDE's CD form:
          frobenius       sum_{i<j} ||W_i^T W_j||_F   (the auxiliaries' classifier weights)
          nontarget_corr  the mean over pairs i<j of the batch mean of cos(r_i, r_j), r_i = p(t_i) without the
                          label's class, centred (a per-sample correlation)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from okdfast.methods import Method, MethodConfig, create_method


class ArrayImages(Dataset):
    """uint8 (N, 32, 32, 3) images + labels, one tensor transform chain per image (the torchvision habit)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: tuple, std: tuple) -> None:
        self.images, self.labels = images, labels
        self.transform = transforms.Compose(
            [
                transforms.ToTensor(),
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


def reference_loader(
    images: np.ndarray, labels: np.ndarray, mean: tuple, std: tuple, batch_size: int, workers: int
) -> DataLoader:
    return DataLoader(
        ArrayImages(images, labels, mean, std),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        persistent_workers=workers > 0,
    )


WRITTEN_OUT_CD_FORMS = ("frobenius", "nontarget_corr")


def reference_method(arch: str, num_classes: int, num_branches: int, cd_form: str | None = None) -> Method:
    """MDE with every okdfast speed default turned off (eager branches, the PyTorch loss path); ``cd_form``: MDE's
    default unless given."""
    config = MethodConfig(num_branches=num_branches, fused_loss="off")
    config = dataclasses.replace(config, cd_form=cd_form or config.cd_form)
    config = dataclasses.replace(config, branch_impl="loop")
    method = create_method("mde", arch, num_classes, config)
    if method.config.cd_form not in WRITTEN_OUT_CD_FORMS:
        raise ValueError(f"the reference trainer writes out the CD forms {', '.join(WRITTEN_OUT_CD_FORMS)} only")
    return method


def nontarget_correlation(aux_logits: list[Tensor], labels: Tensor, temperature: float) -> Tensor:
    """The CD form nontarget_corr written out: per sample, the cosine of the centred non-target probabilities of
    every pair of auxiliaries, averaged over the batch and the pairs."""
    keep = torch.ones_like(aux_logits[0], dtype=torch.bool).scatter(1, labels[:, None], False)
    rows = []
    for z in aux_logits:
        p = F.softmax(z / temperature, dim=1)[keep].view(z.shape[0], -1)
        rows.append(p - p.mean(dim=1, keepdim=True))
    pairs = [(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows))]
    return sum(F.cosine_similarity(rows[i], rows[j], dim=1, eps=1e-8).mean() for i, j in pairs) / len(pairs)


class KLLoss(nn.Module):
    """OKDDip's utils.KL_Loss: T^2 * KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T) + 1e-7)."""

    def __init__(self, temperature: float = 3.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        t = self.temperature
        log_p = F.log_softmax(student / t, dim=1)
        q = F.softmax(teacher / t, dim=1) + 1e-7
        return t * t * nn.KLDivLoss(reduction="batchmean")(log_p, q)


def reference_step(
    method: Method,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    consistency_weight: float,
    criterion: nn.Module,
    criterion_t: nn.Module,
) -> Tensor:
    output = method(images)
    logits, attention = output.logits, output.attention  # (B, K, C), (B, K-1)
    num_aux = logits.shape[1] - 1
    target = sum(attention[:, i : i + 1] * logits[:, i] for i in range(num_aux))  # the FFM target
    loss_true = criterion(target, labels) * method.config.target_ce
    for k in range(logits.shape[1]):  # the per-branch Python loop of the reference code bases
        loss_true = loss_true + criterion(logits[:, k], labels)
    loss_group = sum(criterion_t(logits[:, i], target) for i in range(num_aux))
    aux_mean = sum(logits[:, i] for i in range(num_aux)) / num_aux
    loss_group = loss_group + criterion_t(logits[:, -1], aux_mean.detach())
    cd = 0.0
    if method.config.cd_form == "nontarget_corr":
        cd = nontarget_correlation([logits[:, i] for i in range(num_aux)], labels, method.config.temperature)
    else:
        weights = method.net.classifier_weights(slice(0, num_aux))  # (K-1, C, D)
        for i in range(num_aux):
            for j in range(i + 1, num_aux):
                cd = cd + torch.linalg.matrix_norm(weights[i].t() @ weights[j])
    loss = loss_true + consistency_weight * loss_group + method.cd_weight * cd
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss
