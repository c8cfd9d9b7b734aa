"""A run's parts, built from its config: the method's hyper-parameters, the network on its device (DDP-wrapped
under torchrun), the optimizer and its lr schedule, the train step, and what the run records about its data.

``okdfast.train`` calls these in the order of a nanoGPT-style script (data -> model -> optimizer -> step); the
reproduction planner (``okdfast.reproduce.estimate``) and ``okdfast.evaluate`` build their methods here too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from okdfast.config import TrainConfig
from okdfast.data import DatasetSplits
from okdfast.methods import Method, MethodConfig, create_method, method_class
from okdfast.run.step import TrainStep, build_optimizer
from okdfast.utils.distributed import DistInfo
from okdfast.utils.sync_batchnorm import convert_sync_batchnorm


def method_config(config: TrainConfig) -> MethodConfig:
    """The method's hyper-parameters from the run's config: every MethodConfig field the run's config carries under
    the same name (declared once, in MethodConfig), K (the method's default when --branches is unset), the ramp-up
    scaled to the epochs, and --ffm on/off as a bool."""
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(MethodConfig) if hasattr(config, f.name)}
    branches = config.branches if config.branches is not None else method_class(config.method).default_branches
    return MethodConfig(
        **shared | {"num_branches": branches, "rampup_epochs": config.resolved_rampup(), "ffm": config.ffm == "on"}
    )


def build_method(
    config: TrainConfig, mcfg: MethodConfig, num_classes: int, dist_info: DistInfo, device: torch.device
) -> tuple[Method, nn.Module]:
    """(the method on ``device``, in the run's memory format; what the step calls: the method or its DDP wrapper).
    Under DDP the BatchNorms become global-batch BatchNorms unless --no-sync-bn."""
    method: Method = create_method(config.method, config.arch, num_classes, mcfg)
    from okdfast.run.device_checks import check_best_metric  # needs the method's metric names

    check_best_metric(config, method, torch.device("cpu"))
    if dist_info.enabled and (config.sync_bn is None or config.sync_bn):
        method = convert_sync_batchnorm(method, device)  # type: ignore[assignment]
    method = method.to(device)
    if config.channels_last:
        method = method.to(memory_format=torch.channels_last)
    model: nn.Module = method
    if dist_info.enabled:
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None
        )
    return method, model


def build_training(
    config: TrainConfig,
    method: Method,
    model: nn.Module,
    amp_dtype: torch.dtype | None,
    dist_info: DistInfo,
    device: torch.device,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.amp.GradScaler | None, TrainStep]:
    """The optimizer (SGD), its lr schedule (stepped once per epoch), the fp16 GradScaler (None otherwise) and the
    train step (forward + loss compiled together when asked; CUDA graphs)."""
    optimizer = build_optimizer(
        method.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        implementation=config.optimizer_impl,
        device=device,
        lr_as_tensor=config.cuda_graphs,
    )
    scheduler: torch.optim.lr_scheduler.LRScheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
        if config.lr_schedule == "cosine"
        else torch.optim.lr_scheduler.MultiStepLR(optimizer, config.resolved_milestones(), gamma=config.lr_gamma)
    )
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    step = TrainStep(
        method,
        model,
        optimizer,
        scaler,
        device=device,
        amp_dtype=amp_dtype,
        compile_mode=config.compile,
        cuda_graphs=config.cuda_graphs,
        full_batch=config.batch_size // dist_info.world_size,
    )
    return optimizer, scheduler, scaler, step


def data_record(splits: DatasetSplits) -> dict[str, Any]:
    """What the run trained on (okdfast.data.provenance): path, sha256, partial / lossy and a label for titles."""
    if splits.provenance is not None:
        return splits.provenance.to_dict() | {"subset": splits.source.rpartition("[subset ")[2].rstrip("]") or None}
    return {"source": splits.source, "official": False, "label": f"{splits.name} (generated, not a real data set)"}


def resolved_config(
    config: TrainConfig,
    mcfg: MethodConfig,
    amp_dtype: torch.dtype | None,
    splits: DatasetSplits,
    data: dict[str, Any],
    world_size: int,
    num_params: int,
) -> dict[str, Any]:
    """config.yaml: every field, plus the values derived from them (okdfast.config.recipe.DERIVED_KEYS)."""
    return config.to_dict() | {
        "branches": mcfg.num_branches,
        "milestones_epochs": config.resolved_milestones(),
        "rampup_epochs": mcfg.rampup_epochs,
        "amp_dtype": str(amp_dtype),
        "num_classes": splits.num_classes,
        "data_source": splits.source,
        "data": data,
        "data_file": data_record(splits),
        "world_size": world_size,
        "parameters": num_params,
    }


def tail_notes(plan: Any) -> list[str]:
    """What was done with an epoch's last batch that BatchNorm could not train on (a log line), if anything."""
    dropped = plan.dropped_per_epoch
    if not dropped:
        return []
    return [
        f"the last batch of every epoch would hold {dropped} image ({plan.num_samples} = "
        f"{plan.num_samples // plan.batch_size} x {plan.batch_size} + {dropped} per process): BatchNorm cannot "
        "train on one image, so it is left out of that epoch (the shuffle changes every epoch, so a different image "
        "each time); pick a --batch-size that leaves a larger tail to keep it"
    ]
