"""Reproduce one of the paper's tables: run its grid, compare with the paper, write results.md and the plots.

    python -m okdfast.reproduce --table cifar100 --schedule short --dry-run     # the plan and its estimated time
    python -m okdfast.reproduce --table cifar100 --seeds 3 --data-dir ~/data   # run it (resumable: run it again)
    python -m okdfast.reproduce --table cifar100 --time-budget 600 --jobs 3 --amp   # 10 h, 3 runs at once on a GPU
    python -m okdfast.reproduce --table cifar100 --report-only --update-readme  # tables + plots from what is done
    python -m okdfast.reproduce --list-tables

Tables (methods x architectures x data set), reference numbers and schedules live in okdfast/paper_tables.yaml.
Runs go to OUT/<method>_<arch>_<dataset>_s<seed> (OUT: --out, default runs/reproduce/<table>_<schedule>), one
``python -m okdfast.train`` process each, seed-major so one seed of every method finishes before the second seed
of any. A finished run is skipped, an interrupted one resumed (``--resume auto``). Any flag this command does not
know is passed to every run's okdfast.train (``--amp``, ``--data-dir DIR``, ``--tensorboard``, ``--epochs 5``...).
At the end: OUT/results.md and OUT/results.csv (finished runs only), each run's figures in RUN_DIR/plots and
OUT/plots/comparison.png; ``--update-readme`` rewrites the README's results section from them.
"""

from __future__ import annotations

import argparse
import itertools
import math
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

from okdfast.config import OneLineParser, read_yaml
from okdfast.reproduce.estimate import Speed, SpeedBook, device_label, format_duration, run_device, run_seconds
from okdfast.reproduce.plan import PlannedRun, build_plan, path_part
from okdfast.reproduce.results import collect, readme_block, update_readme, write_results
from okdfast.reproduce.runner import Interrupted, execute
from okdfast.reproduce.tables import Catalog, Schedule, Table, load_catalog

REPO_README = Path(__file__).resolve().parents[2] / "README.md"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m okdfast.reproduce",
        description=__doc__.splitlines()[0],
        epilog="Unknown flags are passed on to every run's okdfast.train (python -m okdfast.train --help).",
        allow_abbrev=False,  # --seed must not be read as --seeds: it is a train flag (and refused, see --seeds)
    )
    parser.add_argument("--table", help="the table to reproduce (--list-tables)")
    parser.add_argument("--list-tables", action="store_true", help="print the tables and exit")
    parser.add_argument(
        "--schedule",
        default=None,
        help="paper (300 epochs, step lr) | short (30, cosine) | small (cifar10-small); default: the table's own",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 of every cell (default: the table's)")
    parser.add_argument("--out", default=None, help="output folder (default runs/reproduce/<table>_<schedule>)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the table's methods")
    parser.add_argument("--archs", default=None, help="comma-separated subset of the table's architectures")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time; run nothing")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="stop after this many minutes: running runs checkpoint (resumable), no new run starts",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once on the device (a large GPU fits several small CIFAR runs; see okdfast/reproduce/runner.py)",
    )
    parser.add_argument("--report-only", action="store_true", help="write results and plots from the runs so far")
    parser.add_argument(
        "--update-readme",
        nargs="?",
        const=str(REPO_README),
        default=None,
        metavar="README",
        help="rewrite this table's block of the README's results section (default: the repository's README.md)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the figures")
    parser.add_argument(
        "--probe",
        default="auto",
        choices=["auto", "all", "arch", "none"],
        help="--dry-run speed: all = a timed probe per (method, arch); arch = one per arch, others scaled by FLOPs; "
        "none = stored speeds only; auto = all on CUDA, arch on the CPU",
    )
    parser.add_argument(
        "--probe-seconds", type=float, default=None, help="timed seconds per probe (default 3 on the CPU, 2 on CUDA)"
    )
    parser.add_argument("--data-file", default=None, help="tables data file (default okdfast/paper_tables.yaml)")
    return parser


def read_catalog(data_file: str | None) -> Catalog:
    """The tables file (``--data-file``, default okdfast/paper_tables.yaml), read first as okdfast reads every YAML
    file (okdfast.config.read_yaml: plain values only, bounded) and checked for its two sections, so that a file of
    another shape is one line naming it, never a traceback from inside the reader."""
    if data_file is not None:
        data = read_yaml(data_file, str(data_file))
        for section in ("schedules", "tables"):
            if not isinstance(data, dict) or not isinstance(data.get(section), dict):
                got = f"a {type(data).__name__}" if not isinstance(data, dict) else f"no {section!r} mapping"
                raise ValueError(f"{data_file}: expected a mapping with 'schedules' and 'tables' (the layout of "
                                 f"okdfast/paper_tables.yaml), got {got}")  # fmt: skip
        try:
            return load_catalog(data_file)
        except (AttributeError, TypeError) as error:  # a section of another shape than the tables file's
            raise ValueError(f"{data_file}: not laid out as okdfast/paper_tables.yaml ({error})") from None
    return load_catalog(None)


def list_tables(catalog: Catalog) -> str:
    lines = []
    for name, table in catalog.tables.items():
        cells = len(table.cells)
        flag = " [test only]" if table.test_only else ""
        lines.append(f"{name:16s} {cells:2d} cells  {table.title}{flag}")
    lines.append("schedules: " + "; ".join(f"{s.name}: {s.train}" for s in catalog.schedules.values()))
    return "\n".join(lines)


def image_counts(catalog: Catalog, table: Table, run: PlannedRun) -> tuple[int, int, int]:
    """(train images, test images, classes) of a run, from the data file (no data is loaded)."""
    sizes = catalog.datasets.get(table.sizes_key)
    if sizes is None:
        raise ValueError(f"{catalog.path}: no sizes for data set {table.sizes_key} under 'datasets'")
    train, test = sizes["train_images"], sizes["test_images"]
    subset = run.config.subset
    if subset is not None:
        train, test = subset, min(max(1, subset // 5), test)
    return train, test, sizes["num_classes"]


def plan_text(
    catalog: Catalog,
    table: Table,
    runs: list[PlannedRun],
    out: Path,
    *,
    schedule_name: str,
    estimate: bool,
    probe: str,
    probe_seconds: float | None = None,
    budget_minutes: float | None,
    jobs: int,
) -> str:
    """The plan as a table (order, status, epochs, speed and its source, estimated time), with totals."""
    schedule = catalog.schedule(schedule_name)
    lines = [
        f"table {table.name}: {table.title}",
        f"schedule {schedule.name}: {schedule.description}",
        f"{len(runs)} runs in {out} ({sum(r.status == 'finished' for r in runs)} finished, "
        f"{sum(r.status == 'partial' for r in runs)} to resume, {sum(r.status == 'new' for r in runs)} new)",
    ]
    seconds: dict[int, float] = {}
    speed_of: dict[tuple[str, str], Speed | None] = {}
    if estimate:
        lines.append(f"device: {device_label(run_device(runs[0].config))}")
        seconds, speed_of = _estimated_seconds(catalog, table, runs, probe, probe_seconds)
    header = f"{'#':>3}  {'seed':>4}  {'method':12s} {'arch':14s} {'status':9s} {'epochs':>9s}"
    if estimate:
        header += f"  {'img/s':>8s}  {'estimate':>14s}  {'done by':>14s}  speed source"
    lines.append(header)
    elapsed = 0.0
    for run in runs:
        line = (
            f"{run.index:3d}  {run.seed:4d}  {run.method:12s} {run.arch:14s} {run.status:9s} "
            f"{f'{run.epochs_done}/{run.config.epochs}':>9s}"
        )
        if estimate:
            if not math.isnan(seconds[run.index]):
                elapsed += seconds[run.index]
            line += _estimate_columns(run, speed_of.get((run.method, run.arch)), seconds[run.index], elapsed,
                                      budget_minutes)  # fmt: skip
        lines.append(line)
    if estimate:
        lines += _estimate_totals(runs, seconds, jobs, budget_minutes)
    return "\n".join(lines)


def _estimated_seconds(
    catalog: Catalog, table: Table, runs: list[PlannedRun], probe: str, probe_seconds: float | None
) -> tuple[dict[int, float], dict[tuple[str, str], Speed | None]]:
    """Each run's estimated seconds (NaN without a speed), and the speed of each (method, arch)."""
    groups = {key: [r for r in runs if (r.method, r.arch) == key] for key in {(r.method, r.arch): 0 for r in runs}}
    num_classes = image_counts(catalog, table, runs[0])[2]
    report = lambda message: print(message, file=sys.stderr, flush=True)
    book = SpeedBook(probe=probe, probe_seconds=probe_seconds, reference_dirs=table.speed_run_dirs)
    speed_of = book.speeds(groups, num_classes, report)
    load_seconds = float(catalog.datasets.get(table.sizes_key, {}).get("load_seconds", 0.0))
    seconds = {}
    for run in runs:
        train, test, _ = image_counts(catalog, table, run)
        seconds[run.index] = run_seconds(run, speed_of.get((run.method, run.arch)), train, test,
                                         load_seconds=load_seconds)  # fmt: skip
    return seconds, speed_of


def _estimate_columns(
    run: PlannedRun, speed: Speed | None, seconds: float, elapsed: float, budget_minutes: float | None
) -> str:
    """A plan line's speed, estimate, done-by and speed-source columns."""
    done_by = format_duration(elapsed) if run.status != "finished" else "-"
    if budget_minutes is not None and run.status != "finished" and elapsed > budget_minutes * 60:
        done_by += " (over)"
    ips = f"{speed.images_per_sec:8.1f}" if speed is not None else f"{'-':>8s}"
    source = f"{speed.source}: {speed.detail}" if speed is not None else "-"
    return f"  {ips}  {format_duration(seconds):>14s}  {done_by:>14s}  {source}"


def _estimate_totals(
    runs: list[PlannedRun], seconds: dict[int, float], jobs: int, budget_minutes: float | None
) -> list[str]:
    """The plan's closing lines: the total, with --jobs, within the time budget, whether it needs a GPU, how it
    was estimated."""
    total = sum(s for s in seconds.values() if not math.isnan(s))
    unknown = sum(math.isnan(s) for s in seconds.values())
    lines = [
        f"total: {format_duration(total)} of device time for the unfinished runs, one after another"
        + (f" ({unknown} runs without a speed: --probe none)" if unknown else "")
    ]
    if jobs > 1:
        lines.append(
            f"with --jobs {jobs}: between {format_duration(total / jobs)} and {format_duration(total)} of wall "
            "time (runs on one device slow each other down; how much is measured only by running them)"
        )
    if budget_minutes is not None:
        unfinished = [seconds[r.index] for r in runs if r.status != "finished"]
        finish_times = itertools.accumulate(0.0 if math.isnan(s) else s for s in unfinished)
        fit = sum(t <= budget_minutes * 60 for t in finish_times)
        lines.append(
            f"time budget {budget_minutes:g} min: about {fit} of the {len(unfinished)} unfinished runs finish in "
            "it, one after another; the run going at the deadline is checkpointed and resumes next time"
        )
    if total > CPU_REASONABLE_S and runs and run_device(runs[0].config).type != "cuda":
        lines.append(
            f"this table needs a GPU: {format_duration(total)} one run after another on this "
            f"{device_label(run_device(runs[0].config))} is "
            "not a reasonable time (--schedule short, --seeds 1 or --methods shorten it); no GPU speed is "
            "measured here, so no GPU estimate is printed"
        )
    lines.append(
        "estimate: remaining epochs x (train images / speed + test images / (3 x speed)) + 10 s start-up per run; "
        "speed sources: runs = images/s logged by earlier runs in OUT; probe = timed training steps on random "
        "tensors now (eager, no data loading; nothing is written); probe x FLOPs = one probe per arch, "
        "scaled by each method's counted training FLOPs (okdfast/reproduce/estimate.py)"
    )
    return lines


CPU_REASONABLE_S = 24 * 3600  # a dry run on a CPU says "needs a GPU" above a day of runs


def data_line(runs: list[PlannedRun]) -> str:
    """Where the runs' data set is found (the first path that holds it), or that it is missing and what a run would
    do: download CIFAR, or stop naming the paths tried."""
    from okdfast.data.cifar import find_cifar
    from okdfast.data.cinic import find_cinic10
    from okdfast.data.locate import download_by_default, search_roots

    if not runs:
        return "data: no run planned"
    config = runs[0].config
    if config.dataset not in ("cifar10", "cifar100", "cinic10"):
        return f"data: {config.dataset} (generated, nothing to read)"
    roots = search_roots(config.data_dir)
    if config.dataset == "cinic10":
        found, tried = find_cinic10(roots)
    else:
        found, tried = find_cifar(config.dataset, roots)
    if found is not None:
        return f"data: {config.dataset} found at {found}"
    argv = runs[0].argv
    told = "--download" in argv or "--no-download" in argv
    downloads = "--download" in argv or (not told and download_by_default(config.dataset, config.data_dir))
    shown = ", ".join(map(str, tried[:4])) + (" ..." if len(tried) > 4 else "")
    if config.dataset != "cinic10" and downloads:
        return f"data: {config.dataset} is not there yet; the first run downloads it (tried {shown})"
    return (f"data: {config.dataset} NOT FOUND (tried {shown}): every run would stop; pass --data-dir, or see the "
            "README's Data section")  # fmt: skip


def references_for_plot(table: Table) -> dict[str, dict[str, float]]:
    refs: dict[str, dict[str, float]] = {}
    for cell in table.cells:
        for ref in cell.references:
            if ref.branch_mean is not None:
                values = {"branch mean": ref.branch_mean}
                if ref.ensemble is not None:
                    values["ensemble"] = ref.ensemble
                refs[f"{cell.method}\n{cell.arch}\n{table.dataset}"] = values
                break
    return refs


class _Request(NamedTuple):
    """What the command line asks for, checked: the table, its schedule, the runs to do now and the whole plan."""

    args: argparse.Namespace
    catalog: Catalog
    table: Table
    schedule: Schedule
    out: Path
    runs: list[PlannedRun]
    whole: list[PlannedRun]
    command: str


def _request(parser: argparse.ArgumentParser, argv: list[str]) -> _Request | None:
    """The checked request (a bad one exits through ``parser.error``); None after ``--list-tables`` printed."""
    args, extra = parser.parse_known_args(argv)
    try:
        catalog = read_catalog(args.data_file)
    except (OSError, ValueError, KeyError) as error:
        parser.error(f"--data-file: {error}")
    if args.list_tables:
        print(list_tables(catalog))
        return None
    if not args.table:
        parser.error("--table is required (python -m okdfast.reproduce --list-tables)")
    if (args.seeds is not None and args.seeds < 1) or args.jobs < 1:
        parser.error("--seeds and --jobs must be >= 1")
    try:
        table = catalog.table(args.table)
        schedule = catalog.schedule(args.schedule or table.default_schedule)
    except KeyError as error:
        parser.error(str(error.args[0]))
    try:  # the names of the tables file become file names: none may leave --out
        out_name = f"{path_part('table', table.name)}_{path_part('schedule', schedule.name)}"
    except ValueError as error:
        parser.error(f"--data-file {catalog.path}: {error}")
    out = Path(args.out) if args.out else Path("runs") / "reproduce" / out_name
    seeds = list(range(args.seeds if args.seeds is not None else table.seeds))
    split = lambda text: [s.strip() for s in text.split(",") if s.strip()] if text else None
    try:
        runs = build_plan(catalog, table, schedule, seeds=seeds, out=out, extra_args=extra,
                          methods=split(args.methods), archs=split(args.archs))  # fmt: skip
        # results.md always shows the whole table; --methods/--archs only choose what runs now
        whole = build_plan(catalog, table, schedule, seeds=seeds, out=out, extra_args=extra)
    except ValueError as error:
        parser.error(str(error))
    command = shlex.join(["python", "-m", "okdfast.reproduce", *argv])
    return _Request(args, catalog, table, schedule, out, runs, whole, command)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    request = _request(build_parser(), argv)
    if request is None:
        return 0
    args, catalog, table, out, runs = request.args, request.catalog, request.table, request.out, request.runs
    schedule = request.schedule
    if args.dry_run:
        print(data_line(runs))
        print(plan_text(catalog, table, runs, out, schedule_name=schedule.name, estimate=True, probe=args.probe,
                        probe_seconds=args.probe_seconds, budget_minutes=args.time_budget, jobs=args.jobs))  # fmt: skip
        return 0
    outcomes: list = []
    interrupted = False
    if not args.report_only:
        print(plan_text(catalog, table, runs, out, schedule_name=schedule.name, estimate=False, probe="none",
                        budget_minutes=None, jobs=args.jobs), flush=True)  # fmt: skip
        deadline = time.monotonic() + 60.0 * args.time_budget if args.time_budget is not None else None
        try:
            outcomes = execute(runs, jobs=args.jobs, deadline=deadline, report=lambda m: print(m, flush=True))
        except Interrupted as stop:  # the runs are checkpointed: write what is finished, then exit 130
            outcomes, interrupted = stop.outcomes, True
    _write_reports(request)
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.result] = counts.get(outcome.result, 0) + 1
    if counts:
        print("runs: " + ", ".join(f"{n} {result}" for result, n in counts.items()))
    unfinished = sum(r.status != "finished" for r in runs)
    if unfinished and not args.report_only:
        print(f"{unfinished} runs not finished: run the same command again to continue them")
    if interrupted:
        return 130
    return 1 if any(o.result == "failed" for o in outcomes) else 0


def _write_reports(request: _Request) -> None:
    """results.md, results.csv and the plots of the whole table, and the README's block when asked."""
    args, catalog, table, schedule, out = request.args, request.catalog, request.table, request.schedule, request.out
    results = collect(table, request.whole)
    plots: list[Path] = []
    if not args.no_plots:
        plots = make_plots(table, results, out)
    md_path, csv_path = write_results(out, table, schedule, results, catalog, command=request.command, plots=plots)
    print(f"wrote {md_path} and {csv_path}")
    if args.update_readme:
        readme = Path(args.update_readme)
        update_readme(readme, readme_block(table, schedule, results, catalog, readme=readme, out=out))
        print(f"updated the results section of {readme}")


def make_plots(table: Table, results: list, out: Path) -> list[Path]:
    """Per-run figures of every run with metrics, and the comparison of the finished ones; [] without matplotlib."""
    try:
        from okdfast.plot import plot_runs
    except ImportError as error:  # pragma: no cover - matplotlib is a dependency
        print(f"no plots: {error}")
        return []
    run_dirs = [r.run_dir for result in results for r in result.planned if (r.run_dir / "metrics.jsonl").is_file()]
    if not run_dirs:
        return []
    try:
        written = plot_runs(run_dirs, out / "plots", references=references_for_plot(table))
    except ImportError as error:
        print(f"no plots: {error}")
        return []
    return written.get("comparison", [])
