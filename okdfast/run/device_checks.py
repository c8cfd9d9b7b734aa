"""The checks a run makes once its device, process count and network are known, before the run folder is written:
each failure is a :class:`~okdfast.errors.ConfigError` naming the flag and the fix, never an error after an epoch.
"""

from __future__ import annotations

import torch

from okdfast.config import TrainConfig
from okdfast.errors import ConfigError
from okdfast.methods import Method
from okdfast.ops.dispatch import triton_available, triton_runs_on
from okdfast.run.scoring import batch_sums, metrics_from_sums


def check_for_device(config: TrainConfig, device: torch.device, world_size: int) -> None:
    if config.batch_size % world_size:
        raise ConfigError(
            f"--batch-size {config.batch_size} is the global batch: it must divide evenly over the {world_size} "
            "processes"
        )
    if config.batch_size // world_size < 2:
        raise ConfigError(
            f"--batch-size {config.batch_size} over {world_size} processes leaves "
            f"{config.batch_size // world_size} image per process: BatchNorm needs two or more"
        )
    if config.fused_loss == "on" and not triton_runs_on(device):
        why = f"they need a CUDA device, and this run is on {device}" if triton_available() else "no triton installed"
        raise ConfigError(f"--fused-loss on: the Triton kernels cannot run here ({why}); use --fused-loss auto (the "
                          "kernels where they run, else the PyTorch reference) or --fused-loss off")  # fmt: skip
    if config.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"--cuda-graphs needs a CUDA device (this run is on {device}); drop the flag")
    if config.cuda_graphs and config.amp == "fp16":
        raise ConfigError("--cuda-graphs with --amp fp16 is not supported (the GradScaler syncs); use --amp bf16")


@torch.no_grad()
def metric_names(method: Method, device: torch.device) -> list[str]:
    """The test metrics ``okdfast.run.scoring.evaluate`` reports for this method (from one eval-mode forward of two
    blank images: no RNG drawn, no statistics updated)."""
    was_training = method.training
    method.eval()
    output = method(torch.zeros(2, 3, 32, 32, device=device))
    heads = method.heads(output)
    method.train(was_training)
    labels = torch.zeros(2, dtype=torch.long, device=device)
    sums = {name: 1.0 for name in batch_sums(method, output.logits, heads, labels, output.attention)}
    return list(metrics_from_sums(sums, method.config.num_branches, list(heads), method.aux_branches))


def check_best_metric(config: TrainConfig, method: Method, device: torch.device) -> None:
    names = [name for name in metric_names(method, device) if name.startswith("acc_")]
    if config.best_metric not in names:
        raise ConfigError(
            f"--best-metric {config.best_metric}: method {config.method} reports {', '.join(names)}; choose one "
            "(best.pt keeps the epoch where it is highest)"
        )
