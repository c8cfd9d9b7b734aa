"""A checkpoint evaluated on its run's own test set: the method and the test set rebuilt from the checkpoint's own
config (the same loader builder and memory format as the run's), every metric of :mod:`okdfast.run.scoring`, and
what they are of. ``python -m okdfast.evaluate`` is its command line.
"""

from __future__ import annotations

from typing import Any

from okdfast.config import TrainConfig
from okdfast.data import build_data_loaders, load_dataset
from okdfast.errors import ConfigError
from okdfast.run.assemble import build_method, data_record, method_config
from okdfast.run.checkpoint_contents import check_same_data, load_weights
from okdfast.run.checkpoint_file import load_checkpoint
from okdfast.run.scoring import evaluate
from okdfast.utils.distributed import DistInfo, setup_distributed

__all__ = ["evaluate_and_describe", "evaluate_checkpoint"]


def evaluate_checkpoint(
    checkpoint: str, *, data_dir: str | None = None, device: str = "auto", batch_size: int = 500
) -> dict[str, float]:
    """Rebuild a run's method and test set from a checkpoint's own config and evaluate it (messages name
    ``okdfast.evaluate``, the command that asked)."""
    return evaluate_and_describe(checkpoint, data_dir=data_dir, device=device, batch_size=batch_size)[0]


def evaluate_and_describe(
    checkpoint: str, *, data_dir: str | None = None, device: str = "auto", batch_size: int = 500
) -> tuple[dict[str, float], dict[str, Any]]:
    """:func:`evaluate_checkpoint`'s metrics, and what they are of: the method, arch, K, its reported head, the
    epochs trained, the data label and the number of test images."""
    where = "okdfast.evaluate"
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"{where} --batch-size {batch_size}: must be an integer >= 1")
    payload = load_checkpoint(checkpoint, where=where)
    config = TrainConfig.from_dict(payload["config"], f"{where} {checkpoint}")
    if data_dir is not None:
        config.data_dir = data_dir
    _, torch_device = setup_distributed(device)
    splits = load_dataset(config.dataset, config.data_dir, subset=config.subset, seed=config.data_seed)
    check_same_data(payload.get("data"), splits, f"{where} {checkpoint}")
    _, test_loader = build_data_loaders(  # the run's own loader builder, on the reference loader
        splits,
        loader="torch",
        device=torch_device,
        batch_size=config.batch_size,
        eval_batch_size=batch_size,
        num_workers=config.workers,
        seed=config.seed,
        channels_last=bool(config.channels_last),
        verbose=False,
    )
    mcfg = method_config(config)
    method, _ = build_method(config, mcfg, splits.num_classes, DistInfo(), torch_device)  # as the run built it
    load_weights(payload, method, f"{where} {checkpoint}")
    metrics = evaluate(method, test_loader)
    state = payload.get("state") or {}
    about = {
        "checkpoint": checkpoint,
        "method": config.method,
        "arch": config.arch,
        "branches": mcfg.num_branches,
        "head": method.head_name,
        "epochs": state.get("epoch"),
        "steps_into_epoch": state.get("step_in_epoch", 0),
        "data": data_record(splits)["label"],
        "test_images": len(splits.test),
    }
    return metrics, about
