"""okdfast.reproduce.paired and its place in results.md: the exact McNemar tail, Holm, the paired bootstrap (exact
regeneration, coverage), seeds paired by number, runs without usable predictions said so, the section and paired.csv
from real training runs, the committed cifar10-small table with a paired declaration, the speed_runs estimate, and
the cifar10-diversity design numbers recomputed from the committed runs they cite."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

from okdfast.reproduce import load_catalog
from okdfast.reproduce.cli import main
from okdfast.reproduce.estimate import SpeedBook
from okdfast.reproduce.paired import (
    SeedRun,
    binomial_two_sided_p,
    compare,
    holm,
    mcnemar,
    paired_bootstrap,
    predicted_half_width,
)
from okdfast.reproduce.plan import build_plan
from okdfast.reproduce.results import README_END, README_START

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "benchmarks" / "results" / "cifar10-small"


def test_binomial_tail_and_holm_against_direct_sums():
    for b, c in [(0, 0), (0, 5), (3, 10), (7, 7), (40, 61)]:
        n, k = b + c, min(b, c)
        direct = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
        assert binomial_two_sided_p(b, c) == pytest.approx(direct, rel=1e-9)
    assert 0 < binomial_two_sided_p(29_000, 31_000) < 1e-9  # large n: in log space, no overflow
    wrong_a = np.array([1, 1, 0, 0, 1], bool)
    wrong_b = np.array([0, 1, 1, 0, 0], bool)
    assert mcnemar(wrong_a, wrong_b)[:2] == (2, 1)
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_paired_bootstrap_regenerates_exactly_and_covers_a_known_difference():
    rng = np.random.default_rng(7)
    seeds, images = 4, 4000
    wrong_b = rng.random((seeds, images)) < 0.25
    flips = rng.random((seeds, images)) < 0.10  # A = B with 10% of the answers redrawn at a lower error rate
    wrong_a = np.where(flips, rng.random((seeds, images)) < 0.05, wrong_b)
    diff = wrong_a.astype(float) - wrong_b
    first, again = paired_bootstrap(diff), paired_bootstrap(diff)
    assert first == again  # a fixed generator: results.md regenerates to the digit
    true = 100 * 0.10 * (0.05 - 0.25)
    assert first.low < true < first.high and first.high < 0 and first.p < 0.01
    # Seeds alike: the mean of S x N paired differences has Var = var(d) / (S N); resampling the seeds counts the
    # per-image noise of the seeds' means once more, (S - 1) / S of it: the two-stage interval is that much wider.
    expected = 1.96 * 100 * diff.std() / math.sqrt(seeds * images) * math.sqrt(1 + (seeds - 1) / seeds)
    assert first.half_width == pytest.approx(expected, rel=0.2)
    fractions = diff + rng.integers(0, 3, diff.shape) / 7  # many distinct per-image values: the image-count path
    shifted = paired_bootstrap(fractions - fractions.mean())
    assert shifted.low < 0 < shifted.high and shifted.p > 0.05
    assert paired_bootstrap(np.zeros((1, 50))).p == 1.0  # identical answers: nothing to tell apart


def write_predictions(run_dir: Path, seed: int, labels: np.ndarray, wrong: np.ndarray, *, epoch: int = 0) -> None:
    """A run folder as the training loop leaves it (summary.json, predictions.npz), ensemble wrong where ``wrong``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    classes = 10
    ensemble = np.where(wrong, (labels + 1) % classes, labels).astype(np.uint8)
    branches = np.stack([ensemble, labels.astype(np.uint8)])  # branch 0 = the ensemble, branch 1 always right
    np.savez_compressed(
        run_dir / "predictions.npz", epoch=np.int64(epoch), labels=labels.astype(np.uint8), branches=branches,
        ensemble=ensemble, head_leader=ensemble, image_index=np.arange(len(labels), dtype=np.int64),
    )  # fmt: skip
    accuracy = 100 * (1 - wrong.mean())
    last = {"epoch": epoch, "acc_ensemble": accuracy, "acc_branch_mean": (accuracy + 100) / 2, "acc_leader": accuracy}
    (run_dir / "summary.json").write_text(json.dumps({"finished": True, "last": last}))


def test_compare_pairs_seeds_by_number_and_says_why_not(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 300)
    runs = {"mde": [], "okddip": []}
    for row, rate in (("mde", 0.2), ("okddip", 0.3)):
        for seed in (0, 1, 2) if row == "mde" else (0, 1):
            run_dir = tmp_path / f"{row}_s{seed}"
            write_predictions(run_dir, seed, labels, rng.random(300) < rate)
            runs[row].append(SeedRun(seed, run_dir, json.loads((run_dir / "summary.json").read_text()), row))
    result = compare("mde", "okddip", "resnet8", "ensemble", runs["mde"], runs["okddip"])
    assert result.status == "ok" and result.seeds == [0, 1] and result.unpaired == ["mde s2"]
    assert result.images == 300 and result.diff == pytest.approx(result.err_a - result.err_b)
    assert len(result.per_seed) == 2 and result.pooled[0] == sum(b for _, b, _, _ in result.per_seed)
    branch_mean = compare("mde", "okddip", "resnet8", "branch_mean", runs["mde"], runs["okddip"])
    assert branch_mean.status == "ok" and branch_mean.pooled is None  # a fraction per image: no McNemar
    assert branch_mean.diff == pytest.approx(result.diff / 2)  # branch 1 always right: half the ensemble's gap
    head = compare("mde", "okddip", "resnet8", "head", runs["mde"], runs["okddip"])  # both heads: the leader
    assert head.diff == pytest.approx(result.diff)

    (runs["okddip"][1].run_dir / "predictions.npz").unlink()
    gone = compare("mde", "okddip", "resnet8", "ensemble", runs["mde"], runs["okddip"])
    assert gone.status == "no per-image predictions (okddip: s1)" and gone.bootstrap is None
    write_predictions(runs["okddip"][1].run_dir, 1, labels, rng.random(300) < 0.3, epoch=3)
    stale = compare("mde", "okddip", "resnet8", "ensemble", runs["mde"], runs["okddip"])
    assert stale.status.startswith("predictions.npz is from epoch 3, the run's last is 0")
    runs["okddip"][0].summary["last"]["acc_ensemble"] = 99.0
    assert "disagrees with summary.json" in compare("mde", "okddip", "resnet8", "ensemble", runs["mde"],
                                                    runs["okddip"][:1]).status  # fmt: skip
    assert compare("mde", "okddip", "resnet8", "ensemble", runs["mde"], []).status.startswith("not finished")


def catalog_with(tmp_path: Path, table: str, **fields) -> Path:
    """A copy of the tables file with ``fields`` set on ``table``."""
    data = yaml.safe_load((REPO / "okdfast" / "paper_tables.yaml").read_text())
    data["tables"][table].update(fields)
    path = tmp_path / "tables.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_catalog_checks_the_paired_declaration(tmp_path):
    with pytest.raises(ValueError, match=r"\['nope'\] are not rows"):
        load_catalog(catalog_with(tmp_path, "synthetic-smoke", paired={"pairs": [["one", "nope"]]}))
    with pytest.raises(ValueError, match="unknown columns"):
        load_catalog(catalog_with(tmp_path, "synthetic-smoke", paired={"reference": "one", "columns": ["top5"]}))
    paired = (
        load_catalog(catalog_with(tmp_path, "synthetic-smoke", paired={"reference": "one"}))
        .tables["synthetic-smoke"]
        .paired
    )
    assert paired.columns == ("ensemble",) and paired.row_pairs(["independent", "one"]) == [("one", "independent")]


def paired_section(path: Path) -> str:
    text = path.read_text()
    return text[text.index("## Paired per-image comparisons") :]


def test_results_md_and_paired_csv_from_real_runs(tmp_path, capsys):
    """Real training runs write predictions.npz; the report compares them, and regenerates them to the digit."""
    from test_reproduce import smoke_config

    from okdfast.train import run

    out = tmp_path / "out"
    tables = catalog_with(tmp_path, "synthetic-smoke", paired={"reference": "one",
                          "columns": ["ensemble", "head", "branch_mean"]})  # fmt: skip
    for seed, method in itertools.product((0, 1), ("independent", "one")):
        run_dir = out / f"{method}_resnet8_synthetic_s{seed}"
        config = dataclasses.replace(smoke_config(out), method=method, seed=seed, out=str(run_dir))
        assert run(config)["finished"]
        assert (run_dir / "predictions.npz").is_file()
    args = ["--table", "synthetic-smoke", "--schedule", "short", "--seeds", "2", "--out", str(out),
            "--data-file", str(tables), "--report-only", "--no-plots"]  # fmt: skip
    assert main(args) == 0
    section = paired_section(out / "results.md")
    assert "**Resolution**" in section and "ensemble ±" in section
    rows = [line for line in section.splitlines() if line.startswith("| ONE vs independent")]
    assert [row.split(" | ")[2] for row in rows] == ["ensemble", "head", "branch mean"]
    assert "independent has no head" in rows[1]  # independent has no head: said, not invented
    with (out / "paired.csv").open() as handle:
        records = list(csv.DictReader(handle))
    assert [(r["row_a"], r["row_b"], r["column"], r["status"]) for r in records] == [
        ("one", "independent", "ensemble", "ok"),
        ("one", "independent", "head", "independent has no head (independent: s0 s1)"),
        ("one", "independent", "branch_mean", "ok"),
    ]
    summaries = {s: json.loads((out / f"one_resnet8_synthetic_s{s}" / "summary.json").read_text()) for s in (0, 1)}
    err_one = statistics.fmean(100 - summaries[s]["last"]["acc_ensemble"] for s in (0, 1))
    assert float(records[0]["err_a"]) == pytest.approx(err_one, abs=1e-3)
    assert records[0]["seeds"] == "0 1" and records[0]["images"] == "25" and records[0]["p_mcnemar"]
    assert float(records[0]["ci_low"]) <= float(records[0]["diff"]) <= float(records[0]["ci_high"])
    diagnostics = (out / "results.md").read_text().split("## Mechanism diagnostics")[1]  # what each mechanism acts on
    one_row = next(line for line in diagnostics.splitlines() if line.startswith("| ONE |"))
    disagreement = statistics.fmean(summaries[s]["last"]["disagreement"] for s in (0, 1))
    assert one_row.split(" | ")[2] == "2" and one_row.split(" | ")[3].startswith(f"{disagreement:.4f} ± ")
    first_csv = (out / "paired.csv").read_text()
    readme = tmp_path / "README.md"
    readme.write_text(f"{README_START}\n{README_END}\n")
    assert main([*args, "--update-readme", str(readme)]) == 0
    assert paired_section(out / "results.md") == section and (out / "paired.csv").read_text() == first_csv
    block = readme.read_text()
    assert "**Resolution**" in block and "(paired per-image comparisons: results.md)" in block
    capsys.readouterr()


def test_the_committed_cifar10_small_runs_have_no_per_image_predictions(tmp_path):
    """Declared comparisons on runs from before predictions.npz: said so in results.md and paired.csv; the table's
    own numbers (results.csv) are unchanged."""
    if not (SMALL / "results.csv").is_file():
        pytest.skip("no committed cifar10-small results")
    copy = tmp_path / "cifar10-small"
    shutil.copytree(SMALL, copy)
    tables = catalog_with(tmp_path, "cifar10-small", paired={"reference": "mde", "columns": ["ensemble", "head"]})
    assert main(["--table", "cifar10-small", "--report-only", "--no-plots", "--out", str(copy),
                 "--data-file", str(tables)]) == 0  # fmt: skip
    section = paired_section(copy / "results.md")
    assert "**Resolution**: none measured yet (no per-image predictions)" in section
    row = "| MDE vs OKDDip | ResNet-20 | ensemble | no per-image predictions (mde: s0 s1 s2; okddip: s0 s1 s2) |"
    assert row in section
    with (copy / "paired.csv").open() as handle:
        assert {r["status"].split(" (")[0] for r in csv.DictReader(handle)} == {"no per-image predictions"}
    strip = lambda path: [{k: v for k, v in r.items() if k != "run_dirs"} for r in csv.DictReader(path.open())]
    assert strip(copy / "results.csv") == strip(SMALL / "results.csv")


def test_speed_runs_give_the_estimate_measured_or_scaled_by_flops(tmp_path):
    if not (SMALL / "mde_resnet20_cifar10_s0" / "metrics.jsonl").is_file():
        pytest.skip("no committed cifar10-small runs")
    catalog = load_catalog()
    table = catalog.table("cifar10-small")
    runs = build_plan(catalog, table, catalog.schedule("small"), seeds=[0], out=tmp_path / "out",
                      extra_args=["--data-dir", str(tmp_path)], methods=["mde", "okddip"])  # fmt: skip
    groups = {(r.method, r.arch): [r] for r in runs}
    only_mde = tmp_path / "reference"
    shutil.copytree(SMALL / "mde_resnet20_cifar10_s0", only_mde / "any-name")
    speeds = SpeedBook(probe="none", reference_dirs=[only_mde]).speeds(groups, 10)
    rows = [json.loads(line) for line in (only_mde / "any-name" / "metrics.jsonl").read_text().splitlines()]
    assert speeds[("mde", "resnet20")].source == "speed_runs"  # found by its config.yaml, not its folder's name
    assert speeds[("mde", "resnet20")].images_per_sec == statistics.median(r["images_per_sec"] for r in rows)
    assert speeds[("okddip", "resnet20")].source == "speed_runs x FLOPs"  # about the FLOPs of MDE: its speed
    assert speeds[("okddip", "resnet20")].images_per_sec == pytest.approx(
        speeds[("mde", "resnet20")].images_per_sec, rel=0.01
    )


def test_the_cifar10_diversity_design_numbers_come_from_the_committed_runs(tmp_path, capsys):
    """The design's variance input is recomputed from the committed cifar10-small runs, its predicted half-widths
    from predicted_half_width, and both appear in the table's description; the plans build with the tables' seeds."""
    catalog = load_catalog()
    main_table, sweep = catalog.table("cifar10-diversity"), catalog.table("cifar10-diversity-sweep")
    assert (main_table.seeds, sweep.seeds, main_table.archs, main_table.data_file) == (
        6, 1, ["resnet8"], "cifar10-jpeg.npz")  # fmt: skip
    # the six rows of the design, and the one the sweep added (the only FFM variant whose attention moved)
    assert main_table.methods == ["independent", "one", "okddip", "mde", "mde-ffm-off", "mde-no-cd", "mde-ffm-per-aux"]
    assert catalog.schedule(main_table.default_schedule).train == {"epochs": 5, "lr_schedule": "cosine"}
    for table in (main_table, sweep):
        runs = build_plan(catalog, table, catalog.schedule("diversity"), seeds=list(range(table.seeds)),
                          out=tmp_path / table.name, extra_args=["--data-dir", str(tmp_path)])  # fmt: skip
        assert len(runs) == len(table.methods) * table.seeds and all(r.config.subset is None for r in runs)
    by_row = {r.method: r.config for r in runs}  # the sweep: every swept flag spelled out
    assert by_row["mde-sw-base"].cd_weight == 0.0 and by_row["mde-sw-nc1"].cd_form == "nontarget_corr"
    assert by_row["mde-sw-ffm-per-aux"].ffm_targets == "per-aux" and by_row["mde-sw-ffm-concat"].cd_weight == 0.0
    assert main(["--table", "cifar10-diversity", "--dry-run", "--probe", "none", "--out", str(tmp_path / "p"),
                 "--data-dir", str(tmp_path)]) == 0  # fmt: skip
    assert "42 runs" in capsys.readouterr().out  # --seeds defaults to the table's 6

    if not (SMALL / "mde_resnet20_cifar10_s0" / "summary.json").is_file():
        pytest.skip("no committed cifar10-small runs")
    rows = ["independent", "dml", "one", "cl_ilr", "okddip", "mde", "mde-ffm-off", "mde-no-cd"]  # with an ensemble
    error = lambda row, s: (
        100 - json.loads((SMALL / f"{row}_resnet20_cifar10_s{s}" / "summary.json").read_text())["last"]["acc_ensemble"]
    )
    variances = [statistics.variance([error(a, s) - error(b, s) for s in range(3)])
                 for a, b in itertools.combinations(rows, 2)]  # fmt: skip
    assert len(variances) == 28 and statistics.fmean(variances) == pytest.approx(3.92, abs=0.005)
    text = main_table.description
    assert "3.92 points^2" in text and "28 pairs" in text
    design = dict(seed_var_measured=3.92, measured_images=1017, images=10_000, image_discordance=0.15)
    for seeds, churn, quoted in [(6, 0.2, "1.40"), (4, 0.2, "1.63"), (8, 0.2, "1.27"), (6, 0.0, "1.76"),
                                 (6, 3.92 * 1017 / 1e4, "0.91")]:  # fmt: skip
        assert f"{predicted_half_width(churn=churn, seeds=seeds, **design):.2f}" == quoted
        assert quoted in text
    assert predicted_half_width(churn=0.2, seeds=6, **design) <= 1.5  # the design's target
    assert f"+-{predicted_half_width(churn=0.2, seeds=1, **design):.1f} points" in sweep.description
