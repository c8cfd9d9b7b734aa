"""Figures of training runs, from the metrics every run folder holds (metrics.jsonl, config.yaml, summary.json).

    python -m okdfast.plot RUN_DIR [RUN_DIR ...] [--out DIR] [--include-unfinished]

Per run, in RUN_DIR/plots/:
- accuracy.png: test top-1 (%) per epoch of every branch (thin), the branch mean (thick), the ensemble (dashed)
  and the method's own head (ONE's gate, MDE's FFM, OKDDip's leader; dotted).
- losses.png: the training loss terms per epoch (total, CE, KD, teacher CE, CD; whichever the method has).
- diversity.png: the branches' diversity per epoch: mean pairwise KL (left axis) and disagreement (right axis).
Given several runs, also OUT/comparison.png (OUT: --out, default the runs' common parent folder + /plots): the
final top-1 error (%) of each experiment, branch mean and ensemble, mean over its seeds with the sample std as
error bar (runs are seeds of one experiment only when their configs are equal in everything but the seed);
finished runs only unless --include-unfinished.

Each ``*_figure`` function returns the matplotlib Figure (object-oriented API, no pyplot state, no backend
switch), so callers and tests can inspect its lines and bars. matplotlib is optional: without it this module says
how to install it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from okdfast.config import OneLineParser, read_yaml
from okdfast.config.recipe import pooling_differences, pooling_key
from okdfast.errors import UserError
from okdfast.utils.metrics_log import read_rows

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL_HINT = "okdfast.plot needs matplotlib: pip install matplotlib"
LOSS_TERMS = ["loss", "ce", "kd", "teacher_ce", "cd"]  # drawn in this order when present, then any others


def _figure(width: float = 7.0, height: float = 4.2) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


@dataclass
class RunData:
    run_dir: Path
    rows: list[dict[str, Any]]  # one per finished epoch (partial rows of an interrupted epoch dropped)
    config: dict[str, Any]
    summary: dict[str, Any]

    @property
    def data_label(self) -> str:
        """The data set as the run recorded it: its name, and what is partial or lossy about it."""
        record = self.summary.get("data") or self.config.get("data_file") or {}
        return record.get("label") or str(self.config.get("dataset", "?"))

    @property
    def label(self) -> str:
        c = self.config
        return f"{c.get('method', '?')} {c.get('arch', '?')} seed {c.get('seed', '?')}, {self.data_label}"

    @property
    def finished(self) -> bool:
        return bool(self.summary.get("finished"))

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(row["epoch"], row[key]) for row in self.rows if row.get(key) is not None]
        return [p[0] for p in points], [float(p[1]) for p in points]


def load_run(run_dir: str | os.PathLike) -> RunData:
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl; pass a run folder written by okdfast.train")
    try:
        rows = [row for row in read_rows(metrics) if not row.get("partial")]
    except ValueError as error:
        raise FileNotFoundError(
            f"{error}: the file was changed by hand; okdfast.train rewrites it on --resume"
        ) from None
    config_file, summary_file = run_dir / "config.yaml", run_dir / "summary.json"
    config = read_yaml(config_file, str(config_file)) if config_file.is_file() else {}
    summary = read_json(summary_file) if summary_file.is_file() else {}
    for path, value in ((config_file, config), (summary_file, summary)):
        if value is not None and not isinstance(value, dict):
            raise UserError(f"{path}: holds a {type(value).__name__}, not the mapping okdfast.train writes")
    return RunData(run_dir, rows, config or {}, summary)


def read_json(path: Path) -> Any:
    """A run's JSON file, or a UserError naming it (a copy cut short, a file edited by hand)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error)[:120]
        raise UserError(f"{path}: cannot be read as JSON ({reason}); okdfast.train writes it whole (atomically): "
                        "a copy was cut short or it was edited; restore it or drop the run") from None  # fmt: skip


def _style_epochs(ax: Any, run: RunData) -> None:
    """Integer epoch ticks; markers on every line when there are few epochs (a 1-epoch run is one point)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(run.rows) <= 40:
        for line in ax.get_lines():
            line.set_marker("o")
            line.set_markersize(3)


# the methods' own heads (okdfast.evaluate): colour and line style in the accuracy figure
HEAD_STYLES = {
    "acc_leader": ("tab:purple", "-"),
    "acc_target": ("tab:green", "-."),
    "acc_gate": ("tab:purple", ":"),
    "acc_aux_ensemble": ("tab:orange", "--"),
    "acc_aux_mean": ("tab:gray", ":"),
}


def _head_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys = {k for row in rows for k in row if k.startswith("acc_")}
    return sorted(k for k in keys if not k.startswith("acc_branch_") and k != "acc_ensemble")


def accuracy_figure(run: RunData) -> Figure:
    """Test top-1 per epoch: one line per branch, the branch mean, the ensemble and the method's head."""
    fig = _figure()
    ax = fig.add_subplot()
    branch_keys = sorted(
        {k for row in run.rows for k in row if k.startswith("acc_branch_") and k[len("acc_branch_") :].isdigit()},
        key=lambda k: int(k.rsplit("_", 1)[1]),
    )
    for key in branch_keys:
        ax.plot(*run.series(key), linewidth=0.9, alpha=0.6, label=f"branch {key.rsplit('_', 1)[1]}")
    ax.plot(*run.series("acc_branch_mean"), color="black", linewidth=2.0, label="branch mean")
    if any("acc_ensemble" in row for row in run.rows):
        ax.plot(*run.series("acc_ensemble"), color="tab:red", linestyle="--", linewidth=1.8, label="ensemble")
    for key in _head_keys(run.rows):
        color, style = HEAD_STYLES.get(key, ("tab:purple", ":"))
        ax.plot(*run.series(key), color=color, linestyle=style, linewidth=1.8, label=key[4:].replace("_", " "))
    ax.set(xlabel="epoch", ylabel="test top-1 accuracy (%)", title=f"Test accuracy: {run.label}")
    _style_epochs(ax, run)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return fig


def loss_figure(run: RunData) -> Figure:
    """Training loss terms per epoch: the mean over the epoch's steps of the total (the weighted sum that is
    back-propagated) and of each unweighted term, as the loop logs them. Log scale when they span > 30x."""
    fig = _figure()
    ax = fig.add_subplot()
    present = {k[len("train_") :] for row in run.rows for k in row if k.startswith("train_")}
    terms = [t for t in LOSS_TERMS if t in present] + sorted(present - set(LOSS_TERMS))
    for term in terms:
        style = {"color": "black", "linewidth": 2.0} if term == "loss" else {"linewidth": 1.3}
        ax.plot(*run.series(f"train_{term}"), label="total" if term == "loss" else term.replace("_", " "), **style)
    ax.set(xlabel="epoch", ylabel="training loss, epoch mean (terms unweighted)", title=f"Loss terms: {run.label}")
    values = [v for line in ax.get_lines() for v in line.get_ydata()]
    if values and min(values) > 0 and max(values) / min(values) > 30:  # KD / CD terms are orders below CE
        ax.set_yscale("log")
    _style_epochs(ax, run)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


DIAGNOSTIC_PANELS = (  # (title, y label, [(metrics key, legend)]): what each mechanism acts on (issue 19)
    ("Disagreement on the test set", "fraction of test images, mean over pairs",
     [("disagreement", "among the auxiliaries"), ("disagreement_all", "among all branches")]),
    ("Pairwise KL on the test set", "mean KL(p_j || p_k)",
     [("diversity_kl", "among the auxiliaries"), ("diversity_kl_all", "among all branches")]),
    ("What CD acts on", "correlation / cosine",
     [("aux_corr", "non-target correlation (nontarget_corr)"), ("classifier_abscos", "classifiers' mean |cos|"),
      ("classifier_cos2", "classifiers' mean cos^2")]),
    ("Loss terms' shares and CD's gradient", "fraction",
     [("share_ce", "CE share"), ("share_teacher_ce", "CE(target) share"), ("share_kd", "KD share"),
      ("share_cd", "CD share"), ("cd_grad_ratio", "|grad CD| / |grad task| on the classifiers")]),
    ("What the FFM does", "",
     [("attention_entropy", "attention entropy / log(K-1)"), ("attention_on_correct", "weight on a correct aux."),
      ("attention_on_wrong", "weight on a wrong aux."), ("attention_self", "a row's weight on its own aux."),
      ("target_gain", "acc(target) - acc(aux. ensemble)")]),
)  # fmt: skip


def diversity_figure(run: RunData) -> Figure:
    """The diversity diagnostics per epoch, one panel per question (DIAGNOSTIC_PANELS): disagreement and pairwise KL
    among the auxiliaries and among all branches, what CD acts on, the loss terms' shares with CD's gradient ratio,
    and the FFM's attention; a panel whose keys the run does not log is left out."""
    panels = [p for p in DIAGNOSTIC_PANELS if any(run.series(key)[0] for key, _ in p[2])]
    fig = _figure()
    fig.set_size_inches(7.0, 2.6 * max(len(panels), 1))
    for i, (title, ylabel, series) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        for key, legend in series:
            epochs, values = run.series(key)
            if epochs:
                ax.plot(epochs, values, marker="o" if len(epochs) < 12 else None, label=legend)
        ax.set(ylabel=ylabel, title=title if i else f"Diversity diagnostics: {run.label}\n{title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        _style_epochs(ax, run)
    if panels:
        fig.axes[-1].set_xlabel("epoch")
    return fig


def comparison_groups(runs: list[RunData]) -> dict[str, dict[str, list[float]]]:
    """Label -> {'branch mean': errors, 'ensemble': errors} of the last epoch, one per run.

    Runs are pooled (as seeds of one experiment, n = the number of runs) only when their configs are equal in
    everything but the seed and the settings that do not change the maths (``okdfast.config.recipe.pooling_key``). The
    label is 'method\\narch\\ndataset', plus the fields that tell apart groups that share those three."""
    pooled: dict[str, list[RunData]] = {}
    for run in runs:
        last = run.summary.get("last") or (run.rows[-1] if run.rows else {})
        if "acc_branch_mean" in last:
            pooled.setdefault(pooling_key(run.config), []).append(run)
    base = {key: _base_label(members[0].config) for key, members in pooled.items()}
    groups: dict[str, dict[str, list[float]]] = {}
    for key, members in pooled.items():
        label = base[key]
        rivals = [pooled[k][0].config for k in pooled if base[k] == label]
        if len(rivals) > 1:
            c = members[0].config
            label += "\n" + " ".join(f"{name}={_short(c.get(name))}" for name in pooling_differences(rivals))
        group = groups.setdefault(label, {"branch mean": [], "ensemble": [], "head": []})
        for run in members:
            last = run.summary.get("last") or run.rows[-1]
            group["branch mean"].append(100.0 - last["acc_branch_mean"])
            if "acc_ensemble" in last:
                group["ensemble"].append(100.0 - last["acc_ensemble"])
            head = _head_of(run.config)
            if head is not None and head in last:
                group["head"].append(100.0 - last[head])
    return groups


def _head_of(config: dict[str, Any]) -> str | None:
    """The metric of the method's own model (``Method.head_name``): acc_gate (ONE), acc_leader (OKDDip, MDE)."""
    from okdfast.methods import list_methods, method_class

    method = config.get("method")
    head = method_class(method).head_name if method in list_methods() else None
    return f"acc_{head}" if head else None


def _base_label(c: dict[str, Any]) -> str:
    return f"{c.get('method', '?')}\n{c.get('arch', '?')}\n{c.get('dataset', '?')}"


def _short(value: Any) -> str:
    if value is None:  # a config field left to the method's default (e.g. cd_weight)
        return "default"
    if isinstance(value, list | tuple):
        return ",".join(_short(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def comparison_figure(
    groups: dict[str, dict[str, list[float]]],
    references: dict[str, dict[str, float]] | None = None,
    data: str | None = None,
) -> Figure:
    """Bars: mean top-1 error per group and metric (branch mean, ensemble, the method's own head: ONE's gate,
    OKDDip's and MDE's leader); error bars: sample std over seeds (only where n > 1). ``references``: group ->
    {'branch mean': x, 'ensemble': y} drawn as black markers (the paper's numbers). ``data``: the data set's label
    (partial or lossy data is named in the title)."""
    fig = _figure(width=max(6.0, 1.4 * len(groups) + 2.0), height=4.6)
    ax = fig.add_subplot()
    metrics = ["branch mean", "ensemble", "head"]
    width = 0.27
    for m, metric in enumerate(metrics):
        xs, heights, errors, counts = [], [], [], []
        for g, values in enumerate(groups.values()):
            if values.get(metric):
                xs.append(g + (m - 1) * width)
                heights.append(statistics.fmean(values[metric]))
                errors.append(statistics.stdev(values[metric]) if len(values[metric]) > 1 else 0.0)
                counts.append(len(values[metric]))
        if not xs:
            continue
        name = "head (gate / leader)" if metric == "head" else metric
        bars = ax.bar(xs, heights, width, label=f"okdfast {name}", alpha=0.85)
        spread = [(x, h, e) for x, h, e, n in zip(xs, heights, errors, counts) if n > 1]  # one seed: no std to show
        if spread:
            ax.errorbar(*zip(*[(x, h) for x, h, _ in spread]), yerr=[e for *_, e in spread], fmt="none",
                        ecolor="black", capsize=3)  # fmt: skip
        for bar, count in zip(bars, counts):
            ax.annotate(
                f"n={count}",
                (bar.get_x() + bar.get_width() / 2, 0),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
                color="white",
            )
    first = True
    for g, key in enumerate(groups):
        for m, metric in enumerate(metrics):
            value = (references or {}).get(key, {}).get(metric)
            if value is not None:
                ax.plot(
                    [g + (m - 1) * width],
                    [value],
                    marker="_",
                    markersize=18,
                    markeredgewidth=2.5,
                    color="black",
                    linestyle="none",
                    label="paper / reference" if first else None,
                    gid="reference",
                )
                first = False
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    title = "Method comparison: mean ± std over seeds" + (f"\n{data}" if data else "")
    ax.set(ylabel="top-1 error (%), last epoch", title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_run(run: RunData, out: Path | None = None) -> list[Path]:
    """accuracy.png, losses.png, diversity.png (when the run has K > 1) into ``out`` (default RUN_DIR/plots)."""
    out = out or run.run_dir / "plots"
    paths = [_save(accuracy_figure(run), out / "accuracy.png"), _save(loss_figure(run), out / "losses.png")]
    if any("diversity_kl" in row for row in run.rows):
        paths.append(_save(diversity_figure(run), out / "diversity.png"))
    return paths


def plot_runs(
    run_dirs: list[str | os.PathLike],
    out: Path | None = None,
    *,
    include_unfinished: bool = False,
    references: dict[str, dict[str, float]] | None = None,
    report: Callable[[str], Any] = lambda line: print(line, file=sys.stderr),
) -> dict[str, list[Path]]:
    """Every run's figures, plus comparison.png in ``out`` when there are several runs. Returns the paths by run
    folder (and 'comparison'); ``report`` gets a line for every run left out and why."""
    runs = [load_run(d) for d in run_dirs]
    written: dict[str, list[Path]] = {str(run.run_dir): plot_run(run) for run in runs if run.rows}
    compared = [run for run in runs if include_unfinished or run.finished]
    for run in runs:
        if not run.rows:
            report(f"skipped {run.run_dir}: no finished epoch in its metrics.jsonl yet (no figure)")
        elif len(runs) > 1 and run not in compared:
            report(f"skipped {run.run_dir} in comparison.png: unfinished ({len(run.rows)} epochs; "
                   "--include-unfinished compares its last epoch)")  # fmt: skip
    if len(runs) > 1 and compared:
        if out is None:
            out = Path(os.path.commonpath([str(run.run_dir.resolve()) for run in runs])) / "plots"
        groups = comparison_groups(compared)
        if groups:
            data = "; ".join(sorted({run.data_label for run in compared}))
            figure = comparison_figure(groups, references, data=data)
            written["comparison"] = [_save(figure, out / "comparison.png")]
    return written


def main(argv: list[str] | None = None) -> dict[str, list[Path]]:
    parser = OneLineParser(prog="python -m okdfast.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run folders written by okdfast.train")
    parser.add_argument("--out", default=None, help="folder of comparison.png (default: common parent + /plots)")
    parser.add_argument(
        "--include-unfinished", action="store_true", help="compare unfinished runs too (their last logged epoch)"
    )
    args = parser.parse_args(argv)
    try:
        written = plot_runs(
            args.run_dirs, Path(args.out) if args.out else None, include_unfinished=args.include_unfinished
        )
    except ImportError as error:
        parser.exit(1, f"{error}\n")
    except (FileNotFoundError, UserError) as error:
        parser.error(str(error))
    for paths in written.values():
        for path in paths:
            print(path)
    return written


if __name__ == "__main__":
    main()
