"""Drop-in: replace a hand-written multi-head distillation loss with ``okdfast.losses.OnlineKDLoss``.

Someone else's trainer: a plain PyTorch MLP with a shared trunk and K classifier heads, trained on synthetic data
(nothing to download) with the usual online-distillation loss written by hand: the sum of the heads' cross-entropies
plus T^2 * KL from the heads' (detached) mean to every head. ``OnlineKDLoss()`` at its defaults is that loss; the
only change in the trainer is one line (stack the heads' logits into (B, K, C) and call the module).

What this script shows, and measures honestly:
1. the two losses and their gradients are identical on the same batch (max abs difference printed);
2. two training runs from the same initialisation, one per loss, follow the same trajectory;
3. the time of the loss (forward + backward) and of a whole train step with each. On CUDA the op runs its fused
   Triton kernel; on a CPU it runs its PyTorch path (the reference values and closed-form gradients, no Triton),
   so there is no speed-up to expect there and the script says which path it measured.

    python examples/drop_in.py                 # CUDA if available, else CPU
    python examples/drop_in.py --device cpu --steps 100 --classes 1000
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from okdfast.losses import OnlineKDLoss
from okdfast.ops.dispatch import use_triton


class MultiHeadNet(nn.Module):
    """A shared trunk and K linear heads: forward returns the list of the heads' logits."""

    def __init__(self, in_features: int, hidden: int, classes: int, heads: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, classes) for _ in range(heads))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def handwritten_loss(head_logits: list[torch.Tensor], y: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """What the trainer had: sum_k CE(z_k, y) + sum_k T^2 KL(softmax(mean_j z_j / T) || softmax(z_k / T))."""
    teacher = torch.stack(head_logits).mean(0).detach()
    ce = sum(F.cross_entropy(z, y) for z in head_logits)
    kd = sum(
        temperature**2
        * F.kl_div(F.log_softmax(z / temperature, -1), F.softmax(teacher / temperature, -1), reduction="batchmean")
        for z in head_logits
    )
    return ce + kd


criterion = OnlineKDLoss(temperature=3.0)


def okdfast_loss(head_logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return criterion(torch.stack(head_logits, dim=1), y)  # the one-line change


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """Median, p20, p80 in ms over ``repeats`` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    data = torch.randn(args.batch * 8, 32, device=device)
    labels = (data @ torch.randn(32, args.classes, device=device)).argmax(1)  # a learnable synthetic task

    # 1. identical values and gradients on one batch
    model = MultiHeadNet(32, 128, args.classes, args.heads).to(device)
    x, y = data[: args.batch], labels[: args.batch]
    results = []
    for loss_fn in (handwritten_loss, okdfast_loss):
        model.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    grad_diff = max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b))
    print(f"loss: hand-written {loss_a:.6f}  OnlineKDLoss {loss_b:.6f}  |diff| {abs(loss_a - loss_b):.2e}")
    print(f"parameter gradients: max |diff| {grad_diff:.2e}")

    # 2. the same training trajectory
    trajectories = []
    for loss_fn in (handwritten_loss, okdfast_loss):
        torch.manual_seed(1)
        model = MultiHeadNet(32, 128, args.classes, args.heads).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for step in range(args.steps):
            lo = (step * args.batch) % data.shape[0]
            xb, yb = data[lo : lo + args.batch], labels[lo : lo + args.batch]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        trajectories.append(losses)
    drift = max(abs(a - b) for a, b in zip(*trajectories))
    print(
        f"{args.steps} SGD steps: loss {trajectories[0][0]:.4f} -> {trajectories[0][-1]:.4f} (hand-written), "
        f"{trajectories[1][0]:.4f} -> {trajectories[1][-1]:.4f} (OnlineKDLoss); max |diff| over the run {drift:.2e}"
    )

    # 3. time: the loss alone (fwd + bwd from fixed logits) and a whole train step
    path = "the fused Triton kernel" if use_triton(x) else "the op's PyTorch path (no Triton on this device)"
    print(f"\ntiming on {device} ({torch.get_num_threads()} threads on CPU), OnlineKDLoss runs {path}:")
    model = MultiHeadNet(32, 128, args.classes, args.heads).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with torch.no_grad():
        fixed = [z.detach() for z in model(x)]
    medians = {}
    for name, loss_fn in (("hand-written", handwritten_loss), ("OnlineKDLoss", okdfast_loss)):

        def loss_only(loss_fn=loss_fn):
            heads = [z.clone().requires_grad_() for z in fixed]
            torch.autograd.grad(loss_fn(heads, y), heads)

        def train_step(loss_fn=loss_fn):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()

        for what, fn in (("loss fwd+bwd", loss_only), ("train step", train_step)):
            median, p20, p80 = timed(fn, device, args.repeats)
            medians[name, what] = median
            print(f"  {name:13s} {what:13s} {median:8.3f} ms  [p20 {p20:.3f}, p80 {p80:.3f}]")
    for what in ("loss fwd+bwd", "train step"):
        ratio = medians["hand-written", what] / medians["OnlineKDLoss", what]
        print(f"  {what}: OnlineKDLoss is x{ratio:.2f} the speed of the hand-written loss (median vs median)")
    if not use_triton(x):
        print(
            "  (measured without Triton: on a GPU the op runs one fused kernel instead; run this there for its number)"
        )


if __name__ == "__main__":
    main()
