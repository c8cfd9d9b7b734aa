"""The eager reference trainer of bench_train.py: online KD written the way researchers write it today.

Faithful to the public OKD code bases (OKDDip's train_one.py / train_GL.py, ONE's cifar_one.py), not a straw man:
fp32, NCHW, a torch DataLoader over a Dataset of per-image torchvision transforms with worker processes and pinned
memory, SGD (Nesterov) stepping the whole model, and the loss as a Python loop over branches with KLDivLoss. The
network is okdfast's own module (so both sides train the same architecture; only the way it is fed and driven
differs) and the method is MDE: CE per branch, CE of the FFM ensemble, T^2 KL of every branch to it, the CD term.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from okdfast.methods import Method


class ArrayImages(Dataset):
    """uint8 (N, 32, 32, 3) images + labels, one PIL-free tensor transform per image (the torchvision habit)."""

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
    cd_weight: float,
    criterion: nn.Module,
    criterion_t: nn.Module,
) -> Tensor:
    output = method(images)
    logits, teacher = output.logits, output.teacher
    loss_true, loss_group = 0.0, 0.0
    for i in range(logits.shape[1]):  # the per-branch Python loop of the reference code bases
        loss_true = loss_true + criterion(logits[:, i], labels)
        loss_group = loss_group + criterion_t(logits[:, i], teacher)
    loss_true = loss_true + criterion(teacher, labels)
    weights = [branch.classifier.weight for branch in method.net.branches]
    cd = 0.0
    pairs = 0
    for i in range(len(weights)):
        for j in range(i + 1, len(weights)):
            cd = cd + F.cosine_similarity(weights[i], weights[j], dim=1).pow(2).mean()
            pairs += 1
    loss = loss_true + consistency_weight * loss_group + cd_weight * cd / pairs
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss
