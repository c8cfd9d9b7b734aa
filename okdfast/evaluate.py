"""Evaluate a checkpoint on its run's own test set: every branch, the branch mean, the ensemble, the method's heads
and the diversity (the definitions are in okdfast/evaluation.py).

    python -m okdfast.evaluate RUN_DIR/best.pt [--data-dir DIR] [--device cpu]

The method and the test set are rebuilt from the checkpoint's own config; a checkpoint of another okdfast layout, a
bad file or other data is refused with one line (exit 2).
"""

from __future__ import annotations

import argparse
import json

from okdfast.assemble import method_config
from okdfast.checkpointing import check_same_data, load_weights
from okdfast.config import TrainConfig
from okdfast.data import build_loaders, load_dataset
from okdfast.errors import EXIT_USER_ERROR, ConfigError, UserError
from okdfast.evaluation import evaluate
from okdfast.methods import create_method
from okdfast.utils.checkpoint import load_checkpoint
from okdfast.utils.distributed import setup_distributed

__all__ = ["evaluate", "evaluate_checkpoint", "main"]


def evaluate_checkpoint(
    checkpoint: str, *, data_dir: str | None = None, device: str = "auto", batch_size: int = 500
) -> dict[str, float]:
    """Rebuild a run's method and test set from a checkpoint's own config and evaluate it (messages name
    ``okdfast.evaluate``, the command that asked)."""
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
    _, test_loader = build_loaders(
        splits, batch_size=config.batch_size, eval_batch_size=batch_size, num_workers=config.workers, seed=config.seed
    )
    method = create_method(config.method, config.arch, splits.num_classes, method_config(config))
    load_weights(payload, method, f"{where} {checkpoint}")
    return evaluate(method.to(torch_device), test_loader, torch_device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m okdfast.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a last.pt or best.pt written by okdfast.train")
    parser.add_argument("--data-dir", default=None, help="where the data set lies (default: the run's own)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args(argv)
    try:
        metrics = evaluate_checkpoint(
            args.checkpoint, data_dir=args.data_dir, device=args.device, batch_size=args.batch_size
        )
    except UserError as error:  # a bad path, checkpoint or data set: one line, no traceback
        parser.exit(EXIT_USER_ERROR, f"okdfast.evaluate: error: {error}\n")
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
