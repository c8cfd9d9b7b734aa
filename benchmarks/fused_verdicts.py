"""The fused ops' measured defaults: ``okdfast/ops/fused_verdicts.json`` from the bench_loss rows of GPU visits.

    python -m benchmarks.fused_verdicts benchmarks/results/gpu/*/loss.csv          # rewrites the file
    python -m benchmarks.fused_verdicts --check benchmarks/results/gpu/*/loss.csv  # exit 1 where it differs

One verdict (``okdfast.ops.fused_default.Verdict``) per row of a fused kernel (``impl`` fused, phase fwd+bwd,
timing ``stream``, on CUDA) of an op that reads them (``OPS_WITH_VERDICTS``) whose run also timed the eager
reference and torch.compile of it at the same shape, dtype and layout: :func:`benchmarks.harness.verdict` of the
kernel against each, from the rows' 20th and 80th percentiles. Against the compiled reference the kernel's row is
``fused-compiled`` (the op inside torch.compile, as a compiled step calls it: its input checks traced away) where the
run timed it (``--impls reference compiled fused fused-compiled``; the visits' presets do not, for time), else
``fused``. A shape measured by several runs keeps the newest run's (the row's ``date``). A row that failed (its
``error`` column) gives nothing. What the default then does with them: ``okdfast/ops/fused_default.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Timing, read_rows, verdict  # noqa: E402
from okdfast.ops.fused_default import OPS_WITH_VERDICTS, VERDICTS_FILE, Verdict, load_verdicts  # noqa: E402
from okdfast.utils.atomic_files import atomic_write_text  # noqa: E402

OTHERS = {"vs_reference": "reference", "vs_compiled": "compiled"}  # the verdict's field: the impl it compares with


def _timing(row: dict[str, str]) -> Timing:
    return Timing(float(row["median_ms"]), float(row["p20_ms"]), float(row["p80_ms"]), 0.0, int(row["samples"]))


def _key(row: dict[str, str]) -> tuple[str, ...]:
    """What one verdict is about, and the run that measured it."""
    return row["run_id"], row["subject"], row["device_arch"], row["dtype"], row["form"], row["shape"]


def verdicts_from_rows(rows: list[dict[str, str]]) -> tuple[Verdict, ...]:
    """The verdicts these rows give (the module docstring's rule), sorted."""
    usable = [
        row
        for row in rows
        if row.get("device") == "cuda" and row.get("device_arch") and row.get("subject") in OPS_WITH_VERDICTS
        and row.get("phase") == "fwd+bwd" and row.get("timing") == "stream" and not row.get("error")
    ]  # fmt: skip
    by_impl = {(_key(row), row["impl"]): row for row in usable}
    newest: dict[tuple[str, ...], tuple[str, Verdict]] = {}
    for (key, impl), row in by_impl.items():
        others = {field: by_impl.get((key, other)) for field, other in OTHERS.items()}
        if impl != "fused" or None in others.values():
            continue
        inside_compile = by_impl.get((key, "fused-compiled"), row)  # the kernel inside torch.compile, if timed
        kernel = {"vs_reference": row, "vs_compiled": inside_compile}
        words = {field: verdict(_timing(kernel[field]), _timing(other)) for field, other in others.items()}
        shape = tuple(int(n) for n in row["shape"].split("x"))
        found = Verdict(row["subject"], row["device_arch"], row["dtype"], row["form"], shape, run_id=row["run_id"],
                        **words)  # fmt: skip
        what = key[1:]
        if what not in newest or row["date"] > newest[what][0]:
            newest[what] = (row["date"], found)
    return tuple(sorted(found for _, found in newest.values()))


def file_text(verdicts: tuple[Verdict, ...], sources: list[str]) -> str:
    """The JSON file okdfast.ops.fused_default loads."""
    content: dict[str, Any] = {
        "generated_by": "python -m benchmarks.fused_verdicts " + " ".join(sources),
        "sources": sources,
        "verdicts": [verdict._asdict() | {"shape": list(verdict.shape)} for verdict in verdicts],
    }
    return json.dumps(content, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("loss_csv", nargs="*", help="bench_loss rows of GPU visits (benchmarks/results/gpu/*/loss.csv)")
    parser.add_argument("--out", default=str(VERDICTS_FILE), help="the verdicts file (default: okdfast's own)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file differs")
    args = parser.parse_args(argv)
    missing = [path for path in args.loss_csv if not Path(path).is_file()]
    if missing:
        parser.error(f"loss_csv: no such file: {', '.join(missing)} (the rows of a GPU visit: benchmarks/GPU.md)")
    rows = [row for path in args.loss_csv for row in read_rows(path)]
    verdicts = verdicts_from_rows(rows)
    sources = sorted(Path(path).as_posix() for path in args.loss_csv)
    if args.check:
        same = load_verdicts(args.out) == verdicts
        print(f"{args.out}: {'matches' if same else 'differs from'} the {len(verdicts)} verdicts of these rows")
        return 0 if same else 1
    atomic_write_text(args.out, file_text(verdicts, sources))
    for found in verdicts:
        print(f"{found.op} {found.arch} {found.dtype} {found.layout} {'x'.join(map(str, found.shape))}: "
              f"vs reference {found.vs_reference}, vs compiled {found.vs_compiled} ({found.run_id})")  # fmt: skip
    print(f"{len(verdicts)} verdicts -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
