"""Run a benchmark's ``main`` with its ``plot`` replaced by a no-op: in a GPU visit only the planned files may land
in OUT_DIR (at most 8 come back), and a chart is drawn from the rows later, on any machine.

    python -m benchmarks.gpu_checks.no_plot benchmarks.bench_branches --quick
    python -m benchmarks.gpu_checks.no_plot benchmarks.bench_loader --quick --loaders gpu torch

For the benchmarks that plot unasked (bench_branches, bench_loader); the others take ``--no-plot``.
"""

from __future__ import annotations

import importlib
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m benchmarks.gpu_checks.no_plot MODULE [ARGS...]")
        return 2
    module = importlib.import_module(argv[0])
    module.plot = lambda *args, **kwargs: print(f"{argv[0]}: plot skipped (a GPU visit returns only its rows)")
    try:
        rc = module.main(argv[1:])
    except SystemExit as stop:
        rc = stop.code
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
