"""The runs of one table: which (method, arch, seed), in which order, with which train command, and how far each is.

Order: seed-major (every cell's seed 0, then every cell's seed 1, ...), cells in the table's order. A run stopped
early (time budget, signal) therefore leaves the most informative results: one seed of every method before the
second seed of any.

Each run is ``python -m okdfast.train`` with: the schedule's values, then the table's, then the user's extra train
flags, then the run's own (method, arch, dataset, seed, out, ``--resume auto``). Status comes from the run folder:
``finished`` (summary.json says so), ``partial`` (a last.pt to resume from) or ``new``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from okdfast.config import TrainConfig, build_parser, parse_config, read_yaml
from okdfast.config.recipe import SESSION_FIELDS, TUNABLE_FIELDS, is_unset, same_value
from okdfast.reproduce.tables import Catalog, Schedule, Table
from okdfast.utils.metrics_log import read_rows

# Flags the runner sets per run; extra train flags may not set them.
MANAGED = ("method", "arch", "dataset", "seed", "out", "resume")
# Config values a run folder must share with the plan to count as the same run (else: refuse, name the field):
# the whole recipe (okdfast.config.recipe), and the seed.
IDENTITY = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in SESSION_FIELDS | TUNABLE_FIELDS)


@dataclass
class PlannedRun:
    index: int  # position in the plan (1-based, the execution order)
    method: str  # the table row: a method, or a variant of one (config.method is the method itself)
    arch: str
    seed: int
    run_dir: Path
    argv: list[str]  # the okdfast.train arguments
    config: TrainConfig  # what those arguments parse to
    status: str = "new"  # new | partial | finished
    epochs_done: int = 0

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "okdfast.train", *self.argv]

    def refresh(self) -> PlannedRun:
        """Re-read the status from the run folder."""
        self.status, self.epochs_done = run_status(self.run_dir, self.config)
        return self


def values_to_argv(values: dict[str, Any]) -> list[str]:
    """TrainConfig values -> CLI flags (``{'lr_schedule': 'cosine', 'nesterov': False}`` -> ``--lr-schedule
    cosine --no-nesterov``)."""
    argv: list[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list | tuple):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def check_extra_args(extra: list[str]) -> None:
    """Extra train flags must parse and must not set what the runner sets per run."""
    parser = build_parser()
    try:
        namespace = parser.parse_args(extra)
    except SystemExit as error:
        raise ValueError(f"extra train arguments {extra}: not valid okdfast.train flags") from error
    defaults = parser.parse_args([])
    clashing = [name for name in MANAGED if getattr(namespace, name) != getattr(defaults, name)]
    if clashing:
        flags = ", ".join("--" + name.replace("_", "-") for name in clashing)
        raise ValueError(f"{flags}: set by the runner for every run; use --methods/--archs/--seeds/--out instead")


def table_data_path(table: Table, extra_args: list[str]) -> Path:
    """Where the table's ``data_file`` lies: in the --data-dir passed on to the runs, else in the folders
    okdfast.data searches ($OKDFAST_DATA, ./data, ~/.cache/okdfast/data); the first place that has it, or the
    first candidate when none has it (the plan then reports it missing)."""
    from okdfast.data.locate import search_roots

    given = [extra_args[i + 1] for i, a in enumerate(extra_args[:-1]) if a == "--data-dir"]
    roots = [Path(given[-1])] if given else search_roots(None)
    candidates = [root if root.name == table.data_file else root / table.data_file for root in roots]
    return next((c for c in candidates if c.is_file()), candidates[0])


def run_status(run_dir: Path, config: TrainConfig) -> tuple[str, int]:
    """('finished' | 'partial' | 'new', epochs done). Raises when the folder holds a different run."""
    config_file = run_dir / "config.yaml"
    if config_file.is_file() and ((run_dir / "last.pt").is_file() or (run_dir / "summary.json").is_file()):
        stored = _mapping(read_yaml(config_file, str(config_file)) or {}, config_file)
        planned = config.to_dict()
        if planned.get("branches") is None:
            planned["branches"] = stored.get("branches")  # the run resolved the method's default K
        differ = [
            k
            for k in IDENTITY
            if k in stored and not is_unset(k, planned.get(k)) and not same_value(stored[k], planned.get(k))
        ]
        if differ:
            detail = ", ".join(f"{k}: folder {stored[k]!r} vs plan {planned.get(k)!r}" for k in differ)
            raise ValueError(
                f"run folder {run_dir} holds another run ({detail}): pass another --out, or remove the folder"
            )
    summary_file = run_dir / "summary.json"
    summary = _mapping(_read_json(summary_file), summary_file) if summary_file.is_file() else {}
    if summary.get("finished") and summary.get("epochs_done", -1) >= config.epochs:
        return "finished", int(summary["epochs_done"])
    if (run_dir / "last.pt").is_file():
        return "partial", _epochs_done(run_dir, summary)
    return "new", 0


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error)[:120]
        raise ValueError(f"{path}: cannot be read as JSON ({reason}); okdfast.train writes it whole, so a copy "
                         "was cut short or it was edited: restore it, or remove the run folder") from None  # fmt: skip


def _mapping(value: Any, path: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds a {type(value).__name__}, not the mapping okdfast.train writes")
    return value


def path_part(kind: str, name: Any) -> str:
    """``name`` as one component of a path (a table, schedule, method variant, arch or data set name from the
    tables file): never a separator, '..' or an absolute path, so that no name writes outside ``--out``."""
    text = str(name)
    if not text or text in (".", "..") or any(c in text for c in ("/", "\\", "\0", os.sep)):
        raise ValueError(f"{kind} {text[:60]!r}: not usable in a file name (no '/', '\\', '..' or empty names); "
                         "rename it in the tables file")  # fmt: skip
    return text


def _epochs_done(run_dir: Path, summary: dict[str, Any]) -> int:
    if "epochs_done" in summary:
        return int(summary["epochs_done"])
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    rows = read_rows(metrics)
    return len({row["epoch"] for row in rows if not row.get("partial")})


def build_plan(
    catalog: Catalog,
    table: Table,
    schedule: Schedule,
    *,
    seeds: list[int],
    out: Path,
    extra_args: list[str] | None = None,
    methods: list[str] | None = None,
    archs: list[str] | None = None,
) -> list[PlannedRun]:
    """Every run of the table (restricted to ``methods`` / ``archs`` when given), seed-major, with its status."""
    extra_args = list(extra_args or [])
    check_extra_args(extra_args)
    for kind, wanted, grid in (("methods", methods, table.methods), ("archs", archs, table.archs)):
        unknown = sorted(set(wanted or []) - set(grid))
        if unknown:
            raise ValueError(f"--{kind} {','.join(unknown)}: not in table {table.name} ({', '.join(grid)})")
    cells = [c for c in table.cells if (methods is None or c.method in methods) and (archs is None or c.arch in archs)]
    passed_on = extra_args
    if table.data_file is not None:  # the table's file, found in the given --data-dir, replaces that flag
        data_path = table_data_path(table, extra_args)
        flag_at = {i for i, a in enumerate(extra_args[:-1]) if a == "--data-dir"}
        passed_on = [a for i, a in enumerate(extra_args) if i not in flag_at and i - 1 not in flag_at]
        passed_on += ["--data-dir", str(data_path)]
    common = values_to_argv(schedule.train) + values_to_argv(table.train) + passed_on
    runs: list[PlannedRun] = []
    for seed in seeds:
        for cell in cells:
            variant = catalog.variant(cell.method)
            parts = [path_part(kind, v) for kind, v in (("method", cell.method), ("arch", cell.arch),
                                                        ("dataset", table.dataset))]  # fmt: skip
            run_dir = out / f"{'_'.join(parts)}_s{seed}"
            own = values_to_argv(variant.train)
            own += ["--method", variant.method, "--arch", cell.arch, "--dataset", table.dataset, "--seed", str(seed)]
            own += ["--out", str(run_dir), "--resume", "auto"]
            argv = common + own
            if "--progress" not in argv:
                argv += ["--progress", "off"]  # logs, not a progress bar, when stdout goes to a file
            config, _ = parse_config(argv, note=lambda line: None)  # the run's own log warns, not the plan
            runs.append(PlannedRun(len(runs) + 1, cell.method, cell.arch, seed, run_dir, argv, config).refresh())
    return runs
