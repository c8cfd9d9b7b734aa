"""The paper's tables as data: ``okdfast/paper_tables.yaml`` -> :class:`Catalog` of tables, schedules and sources.

A table is a grid (rows x architectures on one data set) with, per cell, the reference numbers docs/METHOD.md gives
and the source each comes from. A cell without one says why ("not in docs/METHOD.md"). A row is a method, or a variant:
a method with other flags (an ablation such as MDE without its FFM), defined once under ``variants``. A table may
name the data file it trains on (``data_file``: a partial or lossy set is never mistaken for the official one), the
pairs of rows whose per-image predictions results.md compares (``paired``: okdfast/reproduce/paired.py), its number
of seeds, and a folder of earlier runs whose measured speeds estimate its time (``speed_runs``).
Nothing here runs anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DATA_FILE = Path(__file__).resolve().parents[1] / "paper_tables.yaml"
REPO = Path(__file__).resolve().parents[2]  # speed_runs folders are relative to the repository
NOT_IN_METHOD = "not in docs/METHOD.md"


@dataclass(frozen=True)
class Reference:
    """One reference number of a cell (top-1 error %): branch mean and/or ensemble, or an unlabelled value."""

    source: str  # key into the catalog's sources
    cite: str  # the source written out
    branch_mean: float | None = None
    ensemble: float | None = None
    value: float | None = None  # docs/METHOD.md does not say whether branch mean or ensemble
    std: float | None = None

    def text(self) -> str:
        """'25.74 (24.03)', '28.91', '25.65 ± 0.15' — as the papers write it."""
        main = self.branch_mean if self.branch_mean is not None else self.value
        out = "—" if main is None else f"{main:.2f}"
        if self.std is not None:
            out += f" ± {self.std:.2f}"
        if self.ensemble is not None:
            out += f" ({self.ensemble:.2f})"
        return out


@dataclass(frozen=True)
class Cell:
    method: str
    arch: str
    references: tuple[Reference, ...]

    @property
    def key(self) -> str:
        return f"{self.method}/{self.arch}"


@dataclass(frozen=True)
class Variant:
    """A row of a table that is ``method`` trained with the extra TrainConfig values ``train``."""

    method: str
    train: dict[str, Any]


@dataclass(frozen=True)
class Paired:
    """The paired per-image comparisons of a table: every row against ``reference``, then the explicit ``pairs``
    (row A, row B: the difference is A - B), each in every one of ``columns`` (okdfast.reproduce.paired)."""

    columns: tuple[str, ...] = ("ensemble",)
    reference: str | None = None
    pairs: tuple[tuple[str, str], ...] = ()

    def row_pairs(self, rows: list[str]) -> list[tuple[str, str]]:
        """(A, B) in order: the reference against each other row (table order), then the explicit pairs not yet in."""
        out = [(self.reference, row) for row in rows if self.reference is not None and row != self.reference]
        return out + [pair for pair in self.pairs if pair not in out]


@dataclass(frozen=True)
class Schedule:
    name: str
    description: str
    train: dict[str, Any]  # TrainConfig values


@dataclass
class Table:
    name: str
    title: str
    dataset: str
    methods: list[str]
    archs: list[str]
    cells: list[Cell]  # arch-major, methods in the table's order (the papers' layout)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig values that override the schedule's
    notes: list[str] = field(default_factory=list)
    no_paper: str = NOT_IN_METHOD  # what an empty paper cell says
    test_only: bool = False
    data_file: str | None = None  # a file of the data set to train on, looked up in --data-dir (None: the standard)
    default_schedule: str = "paper"  # the schedule when --schedule is not given
    description: str = ""  # the design and why (results.md prints it)
    paired: Paired | None = None  # the paired per-image comparisons results.md reports (None: none)
    seeds: int = 3  # seeds 0..N-1 of every cell when --seeds is not given
    speed_runs: tuple[str, ...] = ()  # folders of runs (repository-relative) whose images/s estimate this table's

    @property
    def speed_run_dirs(self) -> list[Path]:
        return [REPO / folder for folder in self.speed_runs]

    @property
    def sizes_key(self) -> str:
        """The entry of the catalog's ``datasets`` that gives this table's image counts."""
        return Path(self.data_file).stem if self.data_file else self.dataset

    def cell(self, method: str, arch: str) -> Cell:
        for cell in self.cells:
            if (cell.method, cell.arch) == (method, arch):
                return cell
        raise KeyError(f"{method}/{arch} is not a cell of table {self.name}")


@dataclass
class Catalog:
    tables: dict[str, Table]
    schedules: dict[str, Schedule]
    sources: dict[str, str]  # key -> citation
    labels: dict[str, dict[str, str]]  # 'methods' | 'archs' | 'datasets' -> name -> label
    datasets: dict[str, dict[str, int]]  # name -> train_images, test_images, num_classes
    path: Path
    variants: dict[str, Variant] = field(default_factory=dict)  # row name -> method + extra train values

    def variant(self, row: str) -> Variant:
        """The method and extra train values of a table row (a plain method is a variant of itself)."""
        return self.variants.get(row, Variant(row, {}))

    def table(self, name: str) -> Table:
        if name not in self.tables:
            raise KeyError(f"--table {name}: unknown table; choose one of {', '.join(self.tables)}")
        return self.tables[name]

    def schedule(self, name: str) -> Schedule:
        if name not in self.schedules:
            raise KeyError(f"--schedule {name}: unknown schedule; choose one of {', '.join(self.schedules)}")
        return self.schedules[name]

    def label(self, kind: str, name: str) -> str:
        return self.labels.get(kind, {}).get(name, name)


def _float_or_none(entry: dict[str, Any], key: str) -> float | None:
    return float(entry[key]) if entry.get(key) is not None else None


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read and check the data file: every paper key is a cell of its grid and every source is defined."""
    path = Path(path) if path is not None else DATA_FILE
    data = yaml.safe_load(path.read_text())
    sources = {key: value["cite"] for key, value in data.get("sources", {}).items()}
    schedules = {
        name: Schedule(name, " ".join(str(s["description"]).split()), dict(s.get("train", {})))
        for name, s in data["schedules"].items()
    }
    variants = {
        name: Variant(str(v["method"]), dict(v.get("train", {}))) for name, v in (data.get("variants") or {}).items()
    }
    tables: dict[str, Table] = {}
    for name, t in data["tables"].items():
        table_sources = sources | {key: value["cite"] for key, value in t.get("sources", {}).items()}
        tables[name] = _table(name, t, table_sources, f"{path}: table {name}")
        unknown_rows = [m for m in t["methods"] if m not in variants and not _is_method(m)]
        if unknown_rows:
            raise ValueError(f"{path}: table {name}: rows {unknown_rows} are neither methods nor variants")
        for key in t.get("sources", {}):
            sources.setdefault(key, table_sources[key])
    return Catalog(
        tables=tables,
        schedules=schedules,
        sources=sources,
        labels={kind: dict(values) for kind, values in data.get("labels", {}).items()},
        datasets={name: dict(values) for name, values in data.get("datasets", {}).items()},
        path=path,
        variants=variants,
    )


def _table(name: str, t: dict[str, Any], sources: dict[str, str], where: str) -> Table:
    """One table of the data file, its cells and their paper numbers checked against its grid and ``sources``."""
    paper = t.get("paper") or {}
    grid = {f"{m}/{a}" for a in t["archs"] for m in t["methods"]}
    unknown = sorted(set(paper) - grid)
    if unknown:
        raise ValueError(f"{where}: paper numbers for {unknown}, which are not cells of its grid")
    cells = [
        Cell(method, arch, tuple(_reference(entry, sources, where) for entry in paper.get(f"{method}/{arch}", [])))
        for arch in t["archs"]
        for method in t["methods"]
    ]
    return Table(
        name=name,
        title=t.get("title", name),
        dataset=t["dataset"],
        methods=list(t["methods"]),
        archs=list(t["archs"]),
        cells=cells,
        train=dict(t.get("train", {})),
        notes=[" ".join(str(n).split()) for n in t.get("notes", [])],
        no_paper=t.get("no_paper", NOT_IN_METHOD),
        test_only=bool(t.get("test_only", False)),
        data_file=t.get("data_file"),
        default_schedule=t.get("default_schedule", "paper"),
        description=" ".join(str(t.get("description", "")).split()),
        paired=_paired(t.get("paired"), list(t["methods"]), where),
        seeds=int(t.get("seeds", 3)),
        speed_runs=tuple(t.get("speed_runs", [])),
    )


def _reference(entry: dict[str, Any], sources: dict[str, str], where: str) -> Reference:
    """One published number of a cell, its source checked."""
    if entry["source"] not in sources:
        raise ValueError(f"{where}: unknown source {entry['source']!r}")
    return Reference(
        source=entry["source"],
        cite=sources[entry["source"]],
        branch_mean=_float_or_none(entry, "branch_mean"),
        ensemble=_float_or_none(entry, "ensemble"),
        value=_float_or_none(entry, "value"),
        std=_float_or_none(entry, "std"),
    )


def _paired(entry: dict[str, Any] | None, rows: list[str], where: str) -> Paired | None:
    """The table's ``paired`` entry, checked: its rows are the table's, its columns known (paired.is_column)."""
    from okdfast.reproduce.paired import NAMED_COLUMNS, is_column

    if not entry:
        return None
    unknown_keys = sorted(set(entry) - {"columns", "reference", "pairs"})
    if unknown_keys:
        raise ValueError(f"{where}: paired: unknown keys {unknown_keys} (columns, reference, pairs)")
    paired = Paired(
        columns=tuple(entry.get("columns", ["ensemble"])),
        reference=entry.get("reference"),
        pairs=tuple(tuple(pair) for pair in entry.get("pairs", [])),  # type: ignore[misc]
    )
    named = [paired.reference] if paired.reference is not None else []
    for pair in paired.pairs:
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ValueError(f"{where}: paired: pair {list(pair)} is not two different rows")
        named += pair
    unknown = sorted({row for row in named if row not in rows})
    if unknown:
        raise ValueError(f"{where}: paired: {unknown} are not rows of the table")
    bad = [c for c in paired.columns if not is_column(c)]
    if bad:
        raise ValueError(f"{where}: paired: unknown columns {bad}; use {', '.join(NAMED_COLUMNS)} or branch_<k>")
    if not paired.row_pairs(rows):
        raise ValueError(f"{where}: paired: no pairs (give a reference row or pairs)")
    return paired


def _is_method(name: str) -> bool:
    from okdfast.methods import list_methods

    return name in list_methods()
