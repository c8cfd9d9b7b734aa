"""Evaluate a checkpoint on its run's own test set: every branch, the branch mean, the ensemble, the method's heads
and the diversity (the definitions are in okdfast/run/scoring.py).

    python -m okdfast.evaluate RUN_DIR/best.pt [--data-dir DIR] [--device cpu] [--json]

The method and the test set are rebuilt from the checkpoint's own config; a checkpoint of another okdfast layout, a
bad file or other data is refused with one line (exit 2). The output is a table: what was evaluated on which data
(the data set's label: partial or lossy files are named so), the accuracies (the method's reported head first, then
the branch mean, the ensemble and every branch and head), then the diversity and loss measures, each with its key;
``--json`` prints the metrics as one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from okdfast.errors import EXIT_USER_ERROR, UserError
from okdfast.run.checkpoint_evaluation import evaluate_and_describe, evaluate_checkpoint
from okdfast.run.scoring import evaluate

__all__ = ["evaluate", "evaluate_and_describe", "evaluate_checkpoint", "format_table", "main"]


def format_table(metrics: dict[str, float], about: dict[str, Any]) -> str:
    """The readable form: a title line, the accuracies (reported head first), then the other measures."""
    trained = f"after {about['epochs']} epochs" if about.get("epochs") is not None else "epochs unknown"
    if about.get("steps_into_epoch"):
        trained += f" and {about['steps_into_epoch']} steps"
    lines = [
        f"{about['checkpoint']}: {about['method']} {about['arch']} K={about['branches']}, {trained}",
        f"test data: {about['data']}, {about['test_images']:,} images",
        "",
        f"  {'accuracy (top-1)':32s} {'%':>8s}  key",
    ]
    head = about.get("head")
    order = [f"acc_{head}"] if head else []
    order += ["acc_branch_mean", "acc_ensemble"]
    rest = [k for k in metrics if k.startswith("acc_") and k not in order]
    rest.sort(key=lambda k: ("branch_" not in k, k))  # the branches in order, then the other heads
    accuracies = [k for k in order if k in metrics] + rest
    for key in accuracies:
        name = key[4:].replace("_", " ")
        if head and key == f"acc_{head}":
            name += " (the reported head)"
        lines.append(f"  {name:32s} {metrics[key]:8.2f}  {key}")
    others = [k for k in metrics if k not in accuracies]
    if others:
        lines += ["", f"  {'other measures':32s} {'value':>8s}  key"]
        lines += [f"  {k.replace('_', ' '):32s} {metrics[k]:8.4f}  {k}" for k in others]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m okdfast.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a last.pt or best.pt written by okdfast.train")
    parser.add_argument("--data-dir", default=None, help="where the data set lies (default: the run's own)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object (the machine form)")
    args = parser.parse_args(argv)
    try:
        metrics, about = evaluate_and_describe(
            args.checkpoint, data_dir=args.data_dir, device=args.device, batch_size=args.batch_size
        )
    except UserError as error:  # a bad path, checkpoint or data set: one line, no traceback
        parser.exit(EXIT_USER_ERROR, f"okdfast.evaluate: error: {error}\n")
    print(json.dumps(metrics, indent=2) if args.json else format_table(metrics, about))
    return metrics


if __name__ == "__main__":
    main()
