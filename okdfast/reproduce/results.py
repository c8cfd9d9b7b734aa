"""results.md / results.csv from the run folders of a plan, and the README's results section from them.

Every okdfast number comes from a finished run (summary.json ``finished: true``) and links to that run's
config.yaml and train.log; an unfinished cell says how far it is. Numbers are top-1 error in % (100 - accuracy)
as the papers report them: the branch mean (mean of the K branch errors) and, in brackets, the ensemble (the
mean of the branches' softmax), at the last epoch; mean ± sample std over the finished seeds. "last vs best"
sets the last epoch against the best epoch of each run (the best branch-mean test accuracy over the epochs, the
number some papers report; it picks the epoch on the test set, so the last epoch is the honest one). The seeds
of a cell are pooled only when their stored configs are equal in everything but the seed (okdfast.config.recipe).
A table that declares ``paired`` comparisons also gets the section "Paired per-image comparisons" in results.md
and their numbers in paired.csv (one row per comparison: okdfast.reproduce.paired), from each run's
predictions.npz; the README block then states the resolution they measured.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import okdfast.reproduce.paired as paired
from okdfast.config.recipe import pooling_differences, pooling_key
from okdfast.reproduce.diagnostics import diagnostics_lines
from okdfast.reproduce.plan import PlannedRun
from okdfast.reproduce.tables import Catalog, Cell, Schedule, Table
from okdfast.utils.atomic_files import atomic_write_text

COLUMNS = [
    "method",
    "arch",
    "dataset",
    "paper",
    "okdfast branch mean (ensemble), mean ± std (n seeds)",
    "okdfast head",
    "last vs best epoch",
    "config",
    "log",
]
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
_BLOCK = re.compile(r"<!-- table:(\S+) -->.*?<!-- /table:\1 -->", flags=re.S)
CSV_FIELDS = [
    "table",
    "schedule",
    "method",
    "arch",
    "dataset",
    "branches",
    "seeds_planned",
    "seeds_finished",
    "status",
    "paper",
    "paper_branch_mean",
    "paper_ensemble",
    "paper_source",
    "err_branch_mean",
    "err_branch_mean_std",
    "err_ensemble",
    "err_ensemble_std",
    "head",
    "err_head",
    "err_head_std",
    "best_err_branch_mean",
    "best_err_branch_mean_std",
    "best_epochs",
    "epochs",
    "run_dirs",
]


@dataclass
class RunResult:
    run: PlannedRun
    summary: dict[str, Any]

    def error(self, key: str) -> float | None:
        value = self.summary.get("last", {}).get(key)
        return None if value is None else 100.0 - float(value)

    def best_error(self, key: str) -> tuple[float, int] | None:
        best = self.summary.get("best", {}).get(key)
        return None if best is None else (100.0 - float(best["value"]), int(best["epoch"]))

    @property
    def head_key(self) -> str | None:
        """The metric of the method's own model (``Method.head_name``: ONE's gate, OKDDip's and MDE's leader)."""
        from okdfast.methods import method_class

        head = method_class(self.run.config.method).head_name
        return f"acc_{head}" if head and f"acc_{head}" in self.summary.get("last", {}) else None


@dataclass
class CellResult:
    cell: Cell
    planned: list[PlannedRun]
    finished: list[RunResult] = field(default_factory=list)  # the finished seeds pooled into the cell's numbers
    # Finished runs whose config differs from the pooled ones in more than the seed, with the differing fields.
    unpooled: list[tuple[RunResult, list[str]]] = field(default_factory=list)

    @staticmethod
    def _stats(values: list[float]) -> tuple[float | None, float | None]:
        if not values:
            return None, None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)

    def stats(self, key: str) -> tuple[float | None, float | None]:
        return self._stats([e for r in self.finished if (e := r.error(key)) is not None])

    def best_stats(self, key: str) -> tuple[float | None, float | None, list[int]]:
        bests = [b for r in self.finished if (b := r.best_error(key)) is not None]
        mean, std = self._stats([b[0] for b in bests])
        return mean, std, [b[1] for b in bests]

    @property
    def head_key(self) -> str | None:
        return next((r.head_key for r in self.finished if r.head_key), None)

    def status(self) -> str:
        """'finished', or what is missing: 's0 at epoch 12/30, s1 not started'."""
        if self.planned and len(self.finished) == len(self.planned):
            return "finished"
        if all(run.status == "new" for run in self.planned):
            return f"not yet measured (0 of {len(self.planned)} seeds run)"
        done = {r.run.index for r in self.finished}
        apart = {r.run.index: fields for r, fields in self.unpooled}
        parts = []
        for run in self.planned:
            if run.index in done:
                continue
            if run.index in apart:
                parts.append(
                    f"s{run.seed} not pooled: its config differs from the other seeds' in {', '.join(apart[run.index])}"
                )
                continue
            if run.status == "new":
                parts.append(f"s{run.seed} not started")
            else:
                parts.append(f"s{run.seed} at epoch {run.epochs_done}/{run.config.epochs}")
        return "; ".join(parts) if parts else "not yet measured"


def collect(table: Table, runs: list[PlannedRun]) -> list[CellResult]:
    """One CellResult per cell of the table that has planned runs (finished runs only are read as results)."""
    results = []
    for cell in table.cells:
        planned = [r for r in runs if (r.method, r.arch) == (cell.method, cell.arch)]
        if not planned:
            continue
        cell_result = CellResult(cell, planned)
        for run in planned:
            run.refresh()
            if run.status == "finished":
                summary = json.loads((run.run_dir / "summary.json").read_text())
                cell_result.finished.append(RunResult(run, summary))
        _pool_equal_configs(cell_result)
        results.append(cell_result)
    return results


def _stored_config(run: PlannedRun) -> dict[str, Any]:
    path = run.run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _pool_equal_configs(result: CellResult) -> None:
    """Keep in ``finished`` only runs equal in everything but the seed (okdfast.config.recipe.pooling_key): the largest
    such group (the first seed's on a tie); the others move to ``unpooled`` with the fields that differ."""
    configs = {r.run.index: _stored_config(r.run) for r in result.finished}
    groups: dict[str, list[RunResult]] = {}
    for r in result.finished:
        groups.setdefault(pooling_key(configs[r.run.index]), []).append(r)
    if len(groups) < 2:
        return
    kept = max(groups.values(), key=len)
    reference = configs[kept[0].run.index]
    result.unpooled = [
        (r, pooling_differences([reference, configs[r.run.index]])) for r in result.finished if r not in kept
    ]
    result.finished = kept


def paired_comparisons(table: Table, results: list[CellResult]) -> list[paired.Comparison]:
    """The table's declared comparisons (every arch, pair and column), Holm-adjusted over the table; [] if none."""
    if table.paired is None:
        return []
    cells = {(r.cell.method, r.cell.arch): r for r in results}
    seed_runs = lambda result: [
        paired.SeedRun(r.run.seed, r.run.run_dir, r.summary, r.run.config.method) for r in result.finished
    ]
    comparisons = []
    for arch in table.archs:
        for row_a, row_b in table.paired.row_pairs(table.methods):
            for column in table.paired.columns:
                a, b = cells.get((row_a, arch)), cells.get((row_b, arch))
                if a is None or b is None:
                    missing = row_a if a is None else row_b
                    comparisons.append(paired.Comparison(row_a, row_b, arch, column, f"{missing}: not planned"))
                    continue
                comparisons.append(paired.compare(row_a, row_b, arch, column, seed_runs(a), seed_runs(b)))
    paired.adjust(comparisons)
    return comparisons


# ------------------------------------------------------------------------------------------------------ formatting
def _num(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _link(text: str, target: Path, base: Path) -> str:
    return f"[{text}]({Path(os.path.relpath(target, base)).as_posix()})"


def paper_text(cell: Cell, table: Table, source_numbers: dict[str, int]) -> str:
    if not cell.references:
        return table.no_paper
    return "; ".join(f"{ref.text()} [{source_numbers[ref.source]}]" for ref in cell.references)


def okdfast_text(result: CellResult) -> str:
    n = len(result.finished)
    if n == 0:
        status = result.status()
        return status if status.startswith("not yet measured") else "not finished: " + status
    mean_text = _num(*result.stats("acc_branch_mean"))
    ensemble_mean, ensemble_std = result.stats("acc_ensemble")
    if ensemble_mean is not None:
        mean_text += f" ({_num(ensemble_mean, ensemble_std)})"
    text = f"{mean_text} ({n} seed{'s' if n > 1 else ''})"
    if n < len(result.planned):
        text += f"; not finished: {result.status()}"
    return text


def head_text(result: CellResult) -> str:
    """The method's own model (ONE's gate, OKDDip's and MDE's leader): 'leader 24.10 ± 0.30', or '—'."""
    head = result.head_key
    if head is None or not result.finished:
        return "—"
    return f"{head[4:]} {_num(*result.stats(head))}"


def data_labels(results: list[CellResult]) -> list[str]:
    """The data the finished runs trained on, as they recorded it (name; partial or lossy; sha256)."""
    labels = set()
    for result in results:
        for r in result.finished:
            record = r.summary.get("data") or {}
            if record.get("label"):
                sha = f", sha256 {record['sha256'][:12]}…" if record.get("sha256") else ""
                labels.add(f"{record['label']}{sha}")
    return sorted(labels)


def data_lines(results: list[CellResult]) -> list[str]:
    """The "Data:" lines of a table (each data set its runs trained on), then a blank line; [] when none is known."""
    labels = data_labels(results)
    return [f"Data: **{label}**  " for label in labels] + ([""] if labels else [])


def last_vs_best_text(result: CellResult) -> str:
    if not result.finished:
        return "—"
    last = _num(*result.stats("acc_branch_mean"))
    best_mean, best_std, epochs = result.best_stats("acc_branch_mean")
    last_epochs = sorted({r.run.config.epochs - 1 for r in result.finished})
    return (
        f"last {last} (epoch {', '.join(map(str, last_epochs))}) vs best {_num(best_mean, best_std)} "
        f"(epoch {', '.join(map(str, epochs))})"
    )


def table_rows(
    table: Table, results: list[CellResult], catalog: Catalog, base: Path, source_numbers: dict[str, int]
) -> list[list[str]]:
    rows = []
    for result in results:
        cell = result.cell
        runs = sorted(result.finished, key=lambda r: r.run.seed)
        config = _link("config", runs[0].run.run_dir / "config.yaml", base) if runs else "—"
        logs = " ".join(_link(f"s{r.run.seed}", r.run.run_dir / "train.log", base) for r in runs) or "—"
        rows.append(
            [
                catalog.label("methods", cell.method),
                catalog.label("archs", cell.arch),
                catalog.label("datasets", table.dataset),
                paper_text(cell, table, source_numbers),
                okdfast_text(result),
                head_text(result),
                last_vs_best_text(result),
                config,
                logs,
            ]
        )
    return rows


def markdown_table(rows: list[list[str]], columns: list[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _source_numbers(results: list[CellResult]) -> dict[str, int]:
    numbers: dict[str, int] = {}
    for result in results:
        for ref in result.cell.references:
            numbers.setdefault(ref.source, len(numbers) + 1)
    return numbers


def _provenance(results: list[CellResult]) -> list[str]:
    commits, devices, torches = set(), set(), set()
    for result in results:
        for run in result.finished:
            env_file = run.run.run_dir / "environment.json"
            if env_file.is_file():
                env = json.loads(env_file.read_text())
                commits.add(str(env.get("git_commit")))
                devices.add(f"{env.get('device')} ({env.get('device_name')})")
                torches.add(str(env.get("torch")))
    if not commits:
        return []
    return [
        f"Finished runs were trained at commit(s) {', '.join(sorted(commits))}, on {', '.join(sorted(devices))}, "
        f"torch {', '.join(sorted(torches))} (each run's environment.json)."
    ]


def results_markdown(
    table: Table,
    schedule: Schedule,
    results: list[CellResult],
    catalog: Catalog,
    *,
    base: Path,
    command: str,
    plots: list[Path] | None = None,
    comparisons: list[paired.Comparison] | None = None,
) -> str:
    """results.md; ``comparisons``: the table's paired comparisons when already computed (else computed here)."""
    source_numbers = _source_numbers(results)
    cites = {ref.source: ref.cite for r in results for ref in r.cell.references}
    finished = sum(len(r.finished) for r in results)
    planned = sum(len(r.planned) for r in results)
    lines = [
        f"# Results: {table.title}",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M')} from the run folders below "
        f"({finished} of {planned} runs finished). Do not edit by hand: rerun the command.",
        "",
        "Top-1 error (%) on the test set, **branch mean (ensemble)**, at the last epoch; okdfast: mean ± sample std "
        "over the finished seeds. Only finished runs count; an unfinished cell says how far its runs are. "
        "'last vs best': the last epoch against the best epoch of each run (best branch-mean test accuracy, "
        "picked on the test set). 'okdfast head': the method's own model (ONE's gate, OKDDip's and MDE's leader).",
        "",
    ]
    lines += data_lines(results)
    if table.description:
        lines += [f"Design: {table.description}", ""]
    lines += [
        f"Schedule **{schedule.name}**: {schedule.description}",
        "",
        markdown_table(table_rows(table, results, catalog, base, source_numbers)),
        "",
    ]
    if source_numbers:
        lines += ["Sources of the paper column:", ""]
        lines += [f"[{number}] {cites[key]}" + "  " for key, number in source_numbers.items()]
        lines.append("")
    lines += [f"- {note}" for note in table.notes]
    lines += [f"- {line}" for line in _provenance(results)]
    if table.notes or _provenance(results):
        lines.append("")
    if table.paired is not None:
        comparisons = paired_comparisons(table, results) if comparisons is None else comparisons
        lines += paired.markdown_lines(comparisons, catalog.label)
    lines += diagnostics_lines(results, catalog.label)
    for plot in plots or []:
        lines += [f"![{plot.stem}]({Path(os.path.relpath(plot, base)).as_posix()})", ""]
    return "\n".join(lines)


def results_csv_rows(table: Table, schedule: Schedule, results: list[CellResult]) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        cell, first = result.cell, (result.cell.references[0] if result.cell.references else None)
        head = result.head_key
        mean, std = result.stats("acc_branch_mean")
        ens_mean, ens_std = result.stats("acc_ensemble")
        head_mean, head_std = result.stats(head) if head else (None, None)
        best_mean, best_std, best_epochs = result.best_stats("acc_branch_mean")
        # the K each run trained with (its config.yaml resolves the method's default); the plan's when none finished
        branches = {_stored_config(r.run).get("branches") for r in result.finished} or {
            result.planned[0].config.branches
        }
        rows.append(
            {
                "table": table.name,
                "schedule": schedule.name,
                "method": cell.method,
                "arch": cell.arch,
                "dataset": table.dataset,
                "branches": "/".join(str(b) for b in sorted(branches, key=str)),
                "seeds_planned": len(result.planned),
                "seeds_finished": len(result.finished),
                "status": result.status(),
                "paper": "; ".join(f"{ref.text()} ({ref.source})" for ref in cell.references) or table.no_paper,
                "paper_branch_mean": _csv_num(first.branch_mean if first else None),
                "paper_ensemble": _csv_num(first.ensemble if first else None),
                "paper_source": first.source if first else "",
                "err_branch_mean": _csv_num(mean),
                "err_branch_mean_std": _csv_num(std),
                "err_ensemble": _csv_num(ens_mean),
                "err_ensemble_std": _csv_num(ens_std),
                "head": head[4:] if head else "",
                "err_head": _csv_num(head_mean),
                "err_head_std": _csv_num(head_std),
                "best_err_branch_mean": _csv_num(best_mean),
                "best_err_branch_mean_std": _csv_num(best_std),
                "best_epochs": " ".join(map(str, best_epochs)),
                "epochs": result.planned[0].config.epochs,
                "run_dirs": " ".join(str(r.run.run_dir) for r in result.finished),
            }
        )
    return rows


def _csv_num(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def write_results(
    out: Path,
    table: Table,
    schedule: Schedule,
    results: list[CellResult],
    catalog: Catalog,
    *,
    command: str,
    plots: list[Path] | None = None,
) -> tuple[Path, Path]:
    """results.md and results.csv (and paired.csv when the table declares paired comparisons) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out / "results.md", out / "results.csv"
    comparisons = paired_comparisons(table, results)
    # Replaced atomically, like a run's files: a kill during a report never leaves half a table.
    markdown = results_markdown(
        table, schedule, results, catalog, base=out, command=command, plots=plots, comparisons=comparisons
    )
    atomic_write_text(md_path, markdown)
    atomic_write_text(csv_path, _csv_text(CSV_FIELDS, results_csv_rows(table, schedule, results)))
    if table.paired is not None:
        rows = paired.csv_rows(comparisons, table.name, schedule.name)
        atomic_write_text(out / PAIRED_CSV, _csv_text(paired.CSV_FIELDS, rows))
    return md_path, csv_path


PAIRED_CSV = "paired.csv"


def _csv_text(fields: list[str], rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------- README
def readme_block(
    table: Table, schedule: Schedule, results: list[CellResult], catalog: Catalog, *, readme: Path, out: Path
) -> str:
    """One table's block of the README's results section (links relative to the README)."""
    base = readme.parent
    source_numbers = _source_numbers(results)
    cites = {ref.source: ref.cite for r in results for ref in r.cell.references}
    key = f"{table.name}/{schedule.name}"
    lines = [
        f"<!-- table:{key} -->",
        f"### {table.title}; schedule `{schedule.name}`",
        "",
    ]
    lines += data_lines(results)
    lines += [
        markdown_table(table_rows(table, results, catalog, base, source_numbers)),
        "",
    ]
    lines += [f"[{n}] {cites[k]}" + "  " for k, n in source_numbers.items()]
    if table.paired is not None:
        lines += [line for line in paired.resolution_lines(paired_comparisons(table, results)) if line]
        lines[-1] += " (paired per-image comparisons: results.md)  "
    out_rel = Path(os.path.relpath(out, base)).as_posix()
    details = _link("results.md", out / "results.md", base) if any(r.finished for r in results) else "`results.md`"
    lines += [
        f"Full table, sources and plots: {details} in `{out_rel}`, written by `python -m okdfast.reproduce --table "
        f"{table.name} --schedule {schedule.name} --out {out_rel} --update-readme`.",
        f"<!-- /table:{key} -->",
    ]
    return "\n".join(lines)


README_INTRO = """## Results
Top-1 error (%), branch mean (ensemble), as the papers report it. The paper column comes from docs/METHOD.md section 5
(each number names its source; the MDE paper's own tables are not in docs/METHOD.md); an okdfast cell is filled only
from finished runs, mean ± std over seeds, with links to each run's config and log. Generated by
`python -m okdfast.reproduce ... --update-readme`, one block per table and schedule; do not edit by hand.

```bash
python -m okdfast.reproduce --list-tables                                   # the tables (okdfast/paper_tables.yaml)
python -m okdfast.reproduce --table cifar100 --dry-run                      # the runs and their estimated time
python -m okdfast.reproduce --table cifar100 --seeds 3 --data-dir DIR --amp # run (again: skips finished, resumes)
python -m okdfast.reproduce --table cifar100 --time-budget 600 --jobs 3     # 10 h, 3 runs at once on one GPU
python -m okdfast.reproduce --table cifar100 --schedule short               # 30 epochs, cosine lr (see below)
python -m okdfast.plot RUN_DIR [RUN_DIR ...]                                # accuracy/loss/diversity figures
python -m okdfast.train ... --tensorboard                                   # TensorBoard scalars as well
```
`--schedule short` (30 epochs, cosine lr, ramp-up scaled) is a quick comparison: that it keeps the methods' ranking
of the paper schedule is a claim to be measured on real data, not a result."""


def update_readme(readme: Path, block: str) -> None:
    """Rewrites only the text between the results markers: replaces this table's block (or appends it), keeps the
    other tables' blocks. Raises when the markers are missing."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme}: no '{README_START}' ... '{README_END}' markers; add them around the results")
    section = text[start + len(README_START) : end]
    key = re.match(r"<!-- table:(\S+) -->", block).group(1)  # type: ignore[union-attr]
    bodies = {m.group(1): m.group(0) for m in _BLOCK.finditer(section)}  # dicts keep the section's order
    bodies[key] = block
    order = list(bodies)
    new_section = "\n" + README_INTRO + "\n\n" + "\n\n".join(bodies[k] for k in order) + "\n"
    atomic_write_text(readme, text[: start + len(README_START)] + new_section + text[end:])
