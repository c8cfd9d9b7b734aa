"""Train a multi-branch network with online knowledge distillation: MDE (Li et al., ACCV 2020) and its baselines.

Single process (CPU or one GPU):
    python -m okdfast.train --method mde --arch resnet32 --dataset cifar100 --epochs 300 --amp
    python -m okdfast.train --dataset synthetic --arch resnet8 --epochs 2          # offline smoke run
Several GPUs on one node (DDP; the global batch is batch-size x processes):
    torchrun --standalone --nproc_per_node=4 -m okdfast.train --method mde --amp
Resume an interrupted run (exactly, in --deterministic mode), with the run's own config:
    python -m okdfast.train --out runs/my_run --resume auto

The command line only: flags -> config (okdfast.config) -> the run (okdfast.run.engine.run, read top to bottom
there). Errors the user can fix (okdfast.errors.UserError) end the CLI with one line.
"""

from __future__ import annotations

import sys

from okdfast.config import parse_config
from okdfast.errors import EXIT_USER_ERROR, UserError
from okdfast.methods import list_methods
from okdfast.models import list_models
from okdfast.run.engine import run
from okdfast.utils.failure_record import write_failure_record

__all__ = ["main", "run"]


def main(argv: list[str] | None = None) -> None:
    """The CLI (``python -m okdfast.train`` and the ``okdfast-train`` console script). A UserError (a bad value,
    path, data set, checkpoint, a full disk, a diverged run) prints one line and exits with status 2; anything else
    is a bug and keeps its traceback."""
    config, args = parse_config(argv)
    if args.list_archs or args.list_methods:
        print("\n".join((list_models() if args.list_archs else []) + (list_methods() if args.list_methods else [])))
        return
    try:
        run(config, explicit=args.explicit)
    except UserError as error:
        print(f"okdfast.train: error: {error}", file=sys.stderr, flush=True)
        write_failure_record(error)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        print(
            "okdfast.train: stopped at once (a second signal, or one before training started): nothing was saved "
            "since the last checkpoint; continue with --resume auto",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
