"""okdfast.plot: the figures hold the curves and bars they promise (counted on matplotlib's own objects) and the
PNG files are written; no training needed (run folders are written by hand in the loop's format)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

pytest.importorskip("matplotlib")

from matplotlib.container import BarContainer, ErrorbarContainer  # noqa: E402

from okdfast.plot import (  # noqa: E402
    accuracy_figure,
    comparison_figure,
    comparison_groups,
    diversity_figure,
    load_run,
    loss_figure,
    main,
    plot_runs,
)


def write_run(
    run_dir: Path, *, method: str = "one", seed: int = 0, epochs: int = 5, branches: int = 3, finished: bool = True
) -> Path:
    """A run folder as okdfast.train writes it: config.yaml, metrics.jsonl (one row per epoch), summary.json."""
    run_dir.mkdir(parents=True)
    head = {"one": "gate", "mde": "leader", "okddip": "leader"}.get(method)
    rows = []
    for epoch in range(epochs):
        acc = 20.0 + 10.0 * epoch + seed
        row = {"epoch": epoch, "lr": 0.1, "kd_weight": 0.5, "partial": False, "train_loss": 5.0 - epoch * 0.5}
        row |= {"train_ce": 3.0 - 0.3 * epoch, "train_kd": 0.2 + 0.01 * epoch, "train_teacher_ce": 1.0}
        row |= {"images_per_sec": 100.0, "epoch_seconds": 1.0}
        row |= {f"acc_branch_{k}": acc + k for k in range(branches)}
        row["acc_branch_mean"] = acc + (branches - 1) / 2
        if branches > 1:
            row |= {"acc_ensemble": acc + 3, "diversity_kl": 0.1 * epoch, "disagreement": 0.5 - 0.05 * epoch}
        if head:
            row[f"acc_{head}"] = acc + 4
        rows.append(row)
    if not finished:  # an interrupted epoch: logged as partial, dropped from the curves
        rows.append(rows[-1] | {"epoch": epochs, "partial": True, "acc_branch_mean": 0.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"method": method, "arch": "resnet8", "dataset": "synthetic", "seed": seed, "branches": branches}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {"finished": finished, "epochs_done": epochs, "last": rows[epochs - 1]}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def test_accuracy_figure_has_every_branch_the_mean_the_ensemble_and_the_head(tmp_path):
    run = load_run(write_run(tmp_path / "one", finished=False))
    assert [row["epoch"] for row in run.rows] == [0, 1, 2, 3, 4]  # the partial row is dropped
    ax = accuracy_figure(run).axes[0]
    assert labels(ax) == ["branch 0", "branch 1", "branch 2", "branch mean", "ensemble", "gate"]
    for line in ax.get_lines():
        assert list(line.get_xdata()) == [0, 1, 2, 3, 4]
    mean = next(line for line in ax.get_lines() if line.get_label() == "branch mean")
    assert list(mean.get_ydata()) == [row["acc_branch_mean"] for row in run.rows]


def test_loss_and_diversity_figures(tmp_path):
    run = load_run(write_run(tmp_path / "mde", method="mde"))
    assert labels(loss_figure(run).axes[0]) == ["total", "ce", "kd", "teacher ce"]
    fig = diversity_figure(run)
    assert len(fig.axes) == 2  # the panels of the keys this run logs: disagreement, then the pairwise KL
    assert [len(ax.get_lines()) for ax in fig.axes] == [1, 1]
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == pytest.approx([0.5, 0.45, 0.4, 0.35, 0.3])
    for row in run.rows:  # every diagnostic of issue 19 gets its panel and line
        row |= {"aux_corr": 0.9, "classifier_abscos": 0.1, "share_cd": 0.05, "cd_grad_ratio": 0.01,
                "attention_entropy": 0.95, "attention_on_correct": 0.34, "target_gain": 0.5}  # fmt: skip
    fig = diversity_figure(run)
    assert [len(ax.get_lines()) for ax in fig.axes] == [1, 1, 2, 2, 3]


def test_single_branch_run_has_no_ensemble_nor_diversity(tmp_path):
    run_dir = write_run(tmp_path / "baseline", method="baseline", branches=1)
    ax = accuracy_figure(load_run(run_dir)).axes[0]
    assert labels(ax) == ["branch 0", "branch mean"]
    paths = plot_runs([run_dir])[str(run_dir)]
    assert sorted(p.name for p in paths) == ["accuracy.png", "losses.png"]


def test_comparison_bars_are_seed_means_with_std_error_bars(tmp_path):
    runs = [load_run(write_run(tmp_path / f"one_s{s}", seed=s)) for s in (0, 1, 2)]
    runs.append(load_run(write_run(tmp_path / "mde_s0", method="mde")))
    groups = comparison_groups(runs)
    assert list(groups) == ["one\nresnet8\nsynthetic", "mde\nresnet8\nsynthetic"]
    errors = [100 - (60.0 + s + 1) for s in (0, 1, 2)]  # last epoch (4): acc 60 + seed, branch mean + 1
    assert groups["one\nresnet8\nsynthetic"]["branch mean"] == pytest.approx(errors)

    references = {"one\nresnet8\nsynthetic": {"branch mean": 40.0, "ensemble": 37.0}}
    ax = comparison_figure(groups, references).axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [len(c) for c in bars] == [2, 2, 2]  # branch mean, ensemble and the head (gate, leader), one per group
    assert bars[0][0].get_height() == pytest.approx(statistics.fmean(errors))
    error_bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(error_bars) == 3
    caps = error_bars[0].lines[2][0].get_segments()  # the vertical bar of the first group: mean ± std
    low, high = caps[0][0][1], caps[0][1][1]
    assert high - low == pytest.approx(2 * statistics.stdev(errors))
    references_drawn = [line for line in ax.get_lines() if line.get_gid() == "reference"]
    assert [line.get_ydata()[0] for line in references_drawn] == [40.0, 37.0]  # the 'one' group's markers
    assert [t.get_text() for t in ax.texts] == ["n=3", "n=1"] * 3
    assert groups["one\nresnet8\nsynthetic"]["head"] == pytest.approx([100 - (60.0 + s + 4) for s in (0, 1, 2)])


def test_cli_writes_non_empty_pngs_for_every_run_and_the_comparison(tmp_path, capsys):
    dirs = [write_run(tmp_path / "runs" / f"one_s{s}", seed=s) for s in (0, 1)]
    dirs.append(write_run(tmp_path / "runs" / "mde_s0", method="mde", finished=False))
    written = main([str(d) for d in dirs])
    assert f"skipped {dirs[2]} in comparison.png: unfinished" in capsys.readouterr().err  # says what it left out
    for run_dir in dirs:
        assert sorted(p.name for p in written[str(run_dir)]) == ["accuracy.png", "diversity.png", "losses.png"]
    assert written["comparison"] == [tmp_path / "runs" / "plots" / "comparison.png"]
    for paths in written.values():
        for path in paths:
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000, path
    # the unfinished mde run is left out of the comparison (finished runs only, unless asked)
    finished_only = comparison_groups([load_run(d) for d in dirs if load_run(d).finished])
    assert list(finished_only) == ["one\nresnet8\nsynthetic"]


def test_cli_rejects_a_folder_without_metrics(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no metrics.jsonl" in capsys.readouterr().err
