"""okdfast.reproduce: the paper's tables as data, the plan (order, commands, status), the runner end to end on the
synthetic data (results.md rows and columns, skipping finished runs, resuming an interrupted one, the README
section), the time budget, and the dry run's plan."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from okdfast.config import TrainConfig
from okdfast.reproduce import load_catalog
from okdfast.reproduce.cli import main
from okdfast.reproduce.plan import build_plan
from okdfast.reproduce.results import COLUMNS, README_END, README_START, update_readme
from okdfast.reproduce.runner import Interrupted, execute
from okdfast.train import run

REPO = Path(__file__).resolve().parents[1]


def test_catalog_holds_method_md_numbers_with_their_sources():
    catalog = load_catalog()
    table = catalog.table("cifar100")
    assert (table.dataset, table.archs) == ("cifar100", ["resnet32", "resnet110"])
    assert len(table.cells) == 12
    one = table.cell("one", "resnet32").references
    assert [(r.branch_mean, r.ensemble, r.source) for r in one[:1]] == [(25.74, 24.03, "mcl-okd-readme")]
    assert (one[1].value, one[1].std, one[1].source) == (25.65, 0.15, "okddip-paper")
    assert one[0].text() == "25.74 (24.03)" and one[1].text() == "25.65 ± 0.15"
    assert table.cell("okddip", "resnet110").references[0].text() == "21.05 (19.40)"
    assert table.cell("baseline", "resnet32").references[0].text() == "28.91"
    assert table.cell("mde", "resnet32").references == () and table.no_paper == "not in docs/METHOD.md"
    from okdfast.methods import list_methods
    from okdfast.models import list_models

    for t in catalog.tables.values():  # every grid names registered methods (or variants of them) and architectures
        assert {catalog.variant(m).method for m in t.methods} <= set(list_methods()), t.name
        assert set(t.archs) <= set(list_models()), t.name
    assert catalog.schedule("short").train == {"epochs": 30, "lr_schedule": "cosine"}


def test_plan_is_seed_major_and_builds_train_commands(tmp_path):
    catalog = load_catalog()
    table, schedule = catalog.table("cifar100"), catalog.schedule("short")
    runs = build_plan(catalog, table, schedule, seeds=[0, 1], out=tmp_path, extra_args=["--amp", "bf16"])
    assert len(runs) == 24 and [r.seed for r in runs] == [0] * 12 + [1] * 12  # every cell's seed 0 first
    assert [(r.method, r.arch) for r in runs[:3]] == [
        ("baseline", "resnet32"),
        ("dml", "resnet32"),
        ("cl_ilr", "resnet32"),
    ]
    first = runs[0]
    assert (first.config.epochs, first.config.lr_schedule, first.config.amp) == (30, "cosine", "bf16")
    assert first.run_dir == tmp_path / "baseline_resnet32_cifar100_s0" and first.status == "new"
    assert first.command[1:3] == ["-m", "okdfast.train"] and "--resume" in first.argv
    with pytest.raises(ValueError, match="--seed: set by the runner"):
        build_plan(catalog, table, schedule, seeds=[0], out=tmp_path, extra_args=["--seed", "3"])
    with pytest.raises(ValueError, match="--methods nope"):
        build_plan(catalog, table, schedule, seeds=[0], out=tmp_path, methods=["nope"])


def test_a_run_folder_of_another_run_is_refused(tmp_path):
    catalog = load_catalog()
    table, schedule = catalog.table("synthetic-smoke"), catalog.schedule("paper")
    run_dir = tmp_path / "one_resnet8_synthetic_s0"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("method: one\narch: resnet8\ndataset: synthetic\nseed: 0\nepochs: 7\n")
    (run_dir / "summary.json").write_text(json.dumps({"finished": True, "epochs_done": 7}))
    with pytest.raises(ValueError, match="epochs: folder 7 vs plan 1"):
        build_plan(catalog, table, schedule, seeds=[0], out=tmp_path)


def smoke_config(out: Path, **overrides) -> TrainConfig:
    """The config the runner gives run one/resnet8/seed 0 of synthetic-smoke under --schedule short."""
    values = dict(
        method="one", arch="resnet8", dataset="synthetic", seed=0, epochs=1, lr_schedule="cosine", subset=128,
        batch_size=64, eval_batch_size=500, workers=0, progress="off", out=str(out / "one_resnet8_synthetic_s0"),
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """The results table of results.md (its first table; the diagnostics section has its own)."""
    text = path.read_text().split("## Mechanism diagnostics")[0]
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    split = lambda line: [cell.strip() for cell in line.strip("|").split(" | ")]
    return split(lines[0]), [split(line) for line in lines[1:]]


def test_runner_end_to_end_on_synthetic(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--table", "synthetic-smoke", "--schedule", "short", "--seeds", "2", "--out", str(out)]

    # An interrupted run: one step of the 2-step epoch, then stopped (as by SIGTERM or a time budget).
    partial = run(smoke_config(out, max_steps=1))
    assert not partial["finished"]
    assert main([*args, "--report-only", "--no-plots"]) == 0
    header, rows = read_table(out / "results.md")
    assert header == COLUMNS
    assert rows[1][4] == "not finished: s0 at epoch 0/1; s1 not started"  # unfinished cells say so

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n{README_START}\n## Results\nold text\n{README_END}\n\n## after\nkept\n")
    assert main([*args, "--jobs", "2", "--update-readme", str(readme)]) == 0  # two runs at once on the 2 cores
    printed = capsys.readouterr().out
    assert printed.count("] start ") == 4 and printed.count("] finished after") == 4
    assert "start one resnet8 seed 0 (resuming at epoch 0)" in printed
    assert "resumed from" in (out / "one_resnet8_synthetic_s0" / "train.log").read_text()
    assert (out / "logs" / "one_resnet8_synthetic_s1.log").is_file()  # the process output, outside the run folder
    assert not list(out.glob("*/stdout.log"))

    header, rows = read_table(out / "results.md")
    assert header == COLUMNS
    assert [row[:3] for row in rows] == [["independent", "ResNet-8", "synthetic"], ["ONE", "ResNet-8", "synthetic"]]
    assert rows[0][3] == "no paper number: synthetic data" and rows[1][3] == "90.00 (90.00) [1]"
    for row in rows:
        assert row[4].endswith("(2 seeds)"), row  # 'mean ± std (mean ± std) (2 seeds)'
        assert " ± " in row[4] and row[6].startswith("last ") and " vs best " in row[6]
        assert row[7].startswith("[config](") and row[8].count("[s") == 2
    assert rows[0][5] == "—" and rows[1][5].startswith("gate ") and " ± " in rows[1][5]  # ONE's head: its gate
    for link in (
        out / "independent_resnet8_synthetic_s1" / "train.log",
        out / "one_resnet8_synthetic_s0" / "config.yaml",
    ):
        assert f"]({link.relative_to(out).as_posix()})" in (out / "results.md").read_text()
    errors = [
        100 - json.loads((out / f"one_resnet8_synthetic_s{s}" / "summary.json").read_text())["last"]["acc_branch_mean"]
        for s in (0, 1)
    ]
    assert rows[1][4].startswith(f"{sum(errors) / 2:.2f} ± ")
    with (out / "results.csv").open() as handle:
        records = list(csv.DictReader(handle))
    assert [(r["method"], r["seeds_finished"], r["status"], r["head"]) for r in records] == [
        ("independent", "2", "finished", ""),
        ("one", "2", "finished", "gate"),
    ]
    assert float(records[1]["err_branch_mean"]) == pytest.approx(sum(errors) / 2, abs=1e-3)
    assert (out / "plots" / "comparison.png").stat().st_size > 5000
    assert (out / "one_resnet8_synthetic_s1" / "plots" / "accuracy.png").is_file()

    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n" + README_START) and text.endswith(README_END + "\n\n## after\nkept\n")
    assert "old text" not in text and "<!-- table:synthetic-smoke/short -->" in text
    assert "](out/one_resnet8_synthetic_s0/config.yaml)" in text  # links relative to the README

    # Second invocation: every run is finished, nothing is started or touched; the README block is replaced.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/last.pt")}
    assert main([*args, "--update-readme", str(readme)]) == 0
    assert "] start " not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/last.pt")} == stamps
    assert readme.read_text().count("<!-- table:synthetic-smoke/short -->") == 1

    # The dry run now takes its speeds from the runs' own logs.
    assert main([*args, "--dry-run", "--probe", "none"]) == 0
    assert capsys.readouterr().out.count("runs: median of") == 4


# Stand-in for a training process: makes its run folder and checkpoints on SIGTERM like okdfast.train (exit 128 + 15).
FAKE_RUN = (
    "import signal, sys, time, pathlib\n"
    "path = pathlib.Path(sys.argv[1]); path.parent.mkdir(parents=True, exist_ok=True)\n"
    "signal.signal(signal.SIGTERM, lambda *a: (path.write_text('saved'), sys.exit(143)))\n"
    "time.sleep(60)\n"
)


def fake_command(run) -> list[str]:
    return [sys.executable, "-c", FAKE_RUN, str(run.run_dir / "checkpoint")]


def test_time_budget_stops_the_running_run_and_starts_no_other(tmp_path):
    catalog = load_catalog()
    runs = build_plan(catalog, catalog.table("synthetic-smoke"), catalog.schedule("short"), seeds=[0], out=tmp_path)
    start = time.monotonic()
    outcomes = execute(runs, deadline=start + 1.5, report=lambda message: None, command=fake_command)
    assert time.monotonic() - start < 20
    assert [o.result for o in outcomes] == ["stopped (resumable)", "not started (time budget)"]
    assert (runs[0].run_dir / "checkpoint").read_text() == "saved"


def test_a_missing_data_set_stops_the_runner_after_the_first_run(tmp_path):
    """The first run's okdfast.train exits with DatasetNotFoundError: its failure record (not the log's text) tells
    the runner, which starts no other run; a run that fails otherwise does not stop it."""
    catalog = load_catalog()
    runs = build_plan(catalog, catalog.table("cifar10-small"), catalog.schedule("small"), seeds=[0], out=tmp_path,
                      methods=["baseline", "one"])  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()

    def missing_data(run):
        return [sys.executable, "-m", "okdfast.train", "--dataset", "cifar10", "--data-dir", str(empty),
                "--no-download", "--epochs", "1", "--out", str(run.run_dir)]  # fmt: skip

    env = {"PYTHONPATH": str(REPO), "OKDFAST_DATA": str(empty)}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        messages: list[str] = []
        outcomes = execute(runs, report=messages.append, command=missing_data)
        assert [o.result for o in outcomes] == ["failed", "not started"]
        assert messages[-1].startswith("stopped: the data set is missing")
        record = json.loads((tmp_path / "logs" / f"{runs[0].name}.failure.json").read_text())
        assert "DatasetNotFoundError" in record["kinds"] and "UserError" in record["kinds"]

        def other_failure(run):  # exits 2 with a message naming the data set, but no failure record of that kind
            return [sys.executable, "-c", "import sys; print('DatasetNotFoundError'); sys.exit(2)"]

        outcomes = execute(runs, report=lambda message: None, command=other_failure)
        assert [o.result for o in outcomes] == ["failed", "failed"]


def test_dry_run_prints_the_plan_of_the_cifar100_table(tmp_path):
    env = os.environ | {"PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "okdfast.reproduce", "--table", "cifar100", "--schedule", "short", "--dry-run",
         "--probe", "none", "--out", str(tmp_path / "plan")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "36 runs" in result.stdout and "schedule short" in result.stdout
    assert sum(" new " in line for line in lines) == 36
    assert not (tmp_path / "plan").exists()  # a dry run writes nothing


def test_dry_run_says_where_the_data_is_and_when_a_gpu_is_needed(tmp_path, capsys, monkeypatch):
    from okdfast.reproduce.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OKDFAST_NO_DOWNLOAD", "1")
    monkeypatch.setenv("OKDFAST_DATA", str(tmp_path / "nowhere"))
    assert main(["--table", "cifar10", "--dry-run", "--probe", "none", "--out", str(tmp_path / "a")]) == 0
    assert f"data: cifar10 NOT FOUND (tried {tmp_path / 'nowhere'}" in capsys.readouterr().out
    (tmp_path / "nowhere").mkdir()
    np.savez(tmp_path / "nowhere" / "cifar10.npz", x_train=np.zeros((2, 32, 32, 3), np.uint8), y_train=np.zeros(2),
             x_test=np.zeros((1, 32, 32, 3), np.uint8), y_test=np.zeros(1))  # fmt: skip
    monkeypatch.setattr("okdfast.reproduce.cli.CPU_REASONABLE_S", 1.0)  # any estimate is then "too long"
    assert main(["--table", "cifar10", "--dry-run", "--probe", "arch", "--probe-seconds", "0.2", "--archs",
                 "resnet32", "--methods", "baseline", "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"data: cifar10 found at {tmp_path / 'nowhere' / 'cifar10.npz'}" in out and "this table needs a GPU" in out


def test_dry_run_estimates_from_a_timed_probe_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "plan"
    args = ["--table", "synthetic-smoke", "--seeds", "1", "--out", str(out), "--dry-run", "--probe", "arch"]
    assert main([*args, "--probe-seconds", "0.3"]) == 0
    plan = capsys.readouterr().out
    # one timed probe (of the method with the fewest FLOPs), the other method scaled by its counted FLOPs
    assert plan.count("probe: ") == 1 and plan.count("probe x FLOPs: ") == 1 and "total: " in plan
    assert not out.exists()  # no speeds file, no run folder


def test_variants_are_rows_of_a_method_with_other_flags(tmp_path):
    catalog = load_catalog()
    table = catalog.table("cifar10-small")
    assert table.default_schedule == "small" and table.data_file == "cifar10-exact-subset.npz"
    data = tmp_path / "data"
    data.mkdir()
    runs = build_plan(catalog, table, catalog.schedule("small"), seeds=[0], out=tmp_path / "out",
                      extra_args=["--data-dir", str(data)])  # fmt: skip
    by_row = {run.method: run for run in runs}
    assert set(by_row) == set(table.methods) and len(runs) == len(table.methods) * len(table.archs)
    assert by_row["mde-ffm-off"].config.method == "mde" and by_row["mde-ffm-off"].config.ffm == "off"
    assert by_row["mde-no-cd"].config.cd_weight == 0.0 and by_row["mde"].config.cd_weight is None
    assert all(run.config.data_dir == str(data / "cifar10-exact-subset.npz") for run in runs)
    assert all(run.argv.count("--data-dir") == 1 for run in runs)  # the table's file replaces the folder given
    assert by_row["mde-no-cd"].run_dir.name.startswith("mde-no-cd_")


def test_sigterm_to_the_runner_checkpoints_the_running_runs(tmp_path):
    catalog = load_catalog()
    runs = build_plan(catalog, catalog.table("synthetic-smoke"), catalog.schedule("short"), seeds=[0], out=tmp_path)
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    with pytest.raises(Interrupted) as stop:
        execute(runs, jobs=2, report=lambda message: None, command=fake_command)
    timer.join()
    assert [o.result for o in stop.value.outcomes] == ["stopped (resumable)"] * 2
    assert all((run.run_dir / "checkpoint").read_text() == "saved" for run in runs)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the runner's handler is gone again


def test_update_readme_needs_the_markers_and_keeps_other_tables(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="results:start"):
        update_readme(readme, "<!-- table:a/paper -->\nA\n<!-- /table:a/paper -->")
    readme.write_text(f"head\n{README_START}\nold\n{README_END}\ntail\n")
    update_readme(readme, "<!-- table:a/paper -->\nBLOCK_A1\n<!-- /table:a/paper -->")
    update_readme(readme, "<!-- table:b/short -->\nBLOCK_B\n<!-- /table:b/short -->")
    update_readme(readme, "<!-- table:a/paper -->\nBLOCK_A2\n<!-- /table:a/paper -->")
    text = readme.read_text()
    assert text.startswith(f"head\n{README_START}\n## Results") and text.endswith(f"{README_END}\ntail\n")
    assert "BLOCK_A1" not in text and text.index("BLOCK_A2") < text.index("BLOCK_B") and "old" not in text


def test_the_committed_cifar10_small_table_is_what_its_run_folders_give(tmp_path):
    """The table in benchmarks/results and the README is regenerated, unchanged, from the committed run folders."""
    committed = REPO / "benchmarks" / "results" / "cifar10-small"
    if not (committed / "results.csv").is_file():
        pytest.skip("no committed cifar10-small results")
    copy = tmp_path / "cifar10-small"
    shutil.copytree(committed, copy)
    assert main(["--table", "cifar10-small", "--report-only", "--no-plots", "--out", str(copy)]) == 0

    def rows(path: Path) -> list[dict[str, str]]:
        with path.open() as handle:
            return [{k: v for k, v in row.items() if k != "run_dirs"} for row in csv.DictReader(handle)]

    assert rows(copy / "results.csv") == rows(committed / "results.csv")
    assert all(row["seeds_finished"] == "3" for row in rows(committed / "results.csv"))
    readme = (REPO / "README.md").read_text()
    for row in rows(committed / "results.csv"):
        cell = f"{float(row['err_branch_mean']):.2f} ± {float(row['err_branch_mean_std']):.2f}"
        assert cell in readme, (row["method"], cell)
