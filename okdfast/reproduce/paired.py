"""Paired per-image statistics of two table rows tested on the same images: is row A's error really lower than B's?

Each finished run's ``predictions.npz`` (okdfast/run/predictions.py) gives, per test image, whether a column of the run
(the ensemble, the method's head, the branch mean, one branch) is wrong. Two rows (cells of one architecture) are
compared on the images both were tested on, seed s of A with seed s of B (a seed only one row has is dropped, and
the comparison says so). Numbers are top-1 error in points; the difference is A - B (negative: A errs less).

- **95% interval**: a paired bootstrap over training seeds and test images. Each of ``RESAMPLES`` resamples draws
  the seeds with replacement, then the test images with replacement (the same images for every seed and both
  rows), and takes the mean per-image difference; the interval is the 2.5th and 97.5th percentiles, the p-value
  the two-sided fraction of resamples on the other side of 0, ``2 (1 + min(#<=0, #>=0)) / (RESAMPLES + 1)``. The
  generator is ``numpy.random.default_rng(RNG_SEED)`` for every comparison, so results.md regenerates exactly.
  The two stages err on the wide side: a seed's mean carries the noise of its images, which the seed resampling
  counts once more beside the image resampling (when seeds hardly differ, the interval is up to sqrt(2) wider than
  the spread of the mean of S x N differences; when they differ, much less). With few seeds the seed resampling
  covers the seed-to-seed spread only roughly (S seeds give S^S draws, and the spread of a resampled mean is
  (S - 1) / S of the sample's); with one seed the interval covers the test images only, and the table says so.
- **McNemar**: the exact two-sided binomial test on the discordant images (A wrong and B right: b; A right and B
  wrong: c; under H0 b ~ Binomial(b + c, 1/2)), per seed, and pooled over the seeds (the sum of b and of c: the
  test stratified by seed, conditional on those training runs; it does not see seed-to-seed spread, which is why
  the bootstrap interval is the comparison's main answer). Only for columns that are right or wrong per image (not
  the branch mean, a fraction per image).
- **Holm**: each family of p-values of a table (the bootstrap's, the pooled McNemar's) adjusted over all its
  comparisons (rows x columns), step-down, so that the chance of any false "significant" in the table is <= 5%.

Design arithmetic (:func:`predicted_half_width`): what interval a design of S seeds on N test images will give,
from a measured seed-to-seed spread of paired differences on another test set (okdfast/paper_tables.yaml
cifar10-diversity states its numbers).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RESAMPLES = 2000  # bootstrap resamples per comparison
RNG_SEED = 0  # numpy.random.default_rng seed of every comparison's resamples
CONFIDENCE = 0.95
ALPHA = 0.05  # the familywise level of "significant after Holm"
_CHUNK = 100  # resamples drawn at once (memory: _CHUNK x N image counts at most)

# Columns a table may compare: the ensemble, the branch mean (a fraction per image), the method's own head
# (``Method.head_name``), a named head (``head_<name>`` in predictions.npz) or one branch.
NAMED_COLUMNS = ("ensemble", "branch_mean", "head", "leader", "aux_ensemble", "target", "gate")
_BRANCH = re.compile(r"branch_(\d+)$")


def is_column(name: str) -> bool:
    return name in NAMED_COLUMNS or _BRANCH.match(name) is not None


def column_label(name: str) -> str:
    return {"branch_mean": "branch mean", "aux_ensemble": "auxiliary ensemble"}.get(name, name.replace("_", " "))


# ---------------------------------------------------------------------------------------------------- the tests
def binomial_two_sided_p(b: int, c: int) -> float:
    """Exact two-sided p of b successes in b + c trials under p = 1/2: min(1, 2 P(X <= min(b, c)))."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    i = np.arange(k, dtype=np.float64)
    # log C(n, i) for i = 0..k by the recurrence C(n, i + 1) = C(n, i) (n - i) / (i + 1), then minus n log 2
    log_pmf = np.concatenate([[0.0], np.cumsum(np.log(n - i) - np.log(i + 1))]) - n * math.log(2.0)
    top = float(log_pmf.max())
    return min(1.0, 2.0 * math.exp(top) * float(np.exp(log_pmf - top).sum()))


def mcnemar(wrong_a: np.ndarray, wrong_b: np.ndarray) -> tuple[int, int, float]:
    """(b, c, p): images only A gets wrong, images only B gets wrong, and the exact two-sided McNemar p."""
    b = int(np.count_nonzero(wrong_a & ~wrong_b))
    c = int(np.count_nonzero(~wrong_a & wrong_b))
    return b, c, binomial_two_sided_p(b, c)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (compare each with the familywise level)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Bootstrap:
    low: float  # points
    high: float
    p: float  # two-sided, H0: no difference

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def paired_bootstrap(diff: np.ndarray, *, resamples: int = RESAMPLES, seed: int = RNG_SEED) -> Bootstrap:
    """``diff`` (S, N): per seed and test image, error of A - error of B (in {-1, 0, 1}, or fractions). Resamples
    seeds, then images (the same images for every seed), both with replacement; returns the percentile interval of
    the mean difference in points and the bootstrap p-value."""
    seeds, images = diff.shape
    rng = np.random.default_rng(seed)
    seed_counts = np.stack([np.bincount(row, minlength=seeds) for row in rng.integers(0, seeds, (resamples, seeds))])
    # Drawing N images with replacement draws each distinct pattern of per-image differences (over the seeds) a
    # multinomial number of times, the same distribution in far fewer numbers when the patterns are few (a right /
    # wrong column: at most 3^S, mostly 0); for many patterns (the branch mean's fractions) image counts are drawn.
    values = diff.astype(np.float64).T  # (N, S)
    patterns, frequency = np.unique(values, axis=0, return_counts=True)  # (U, S), (U,)
    few = len(patterns) * 8 <= images
    stats = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        n = min(_CHUNK, resamples - start)
        if few:
            counts = rng.multinomial(images, frequency / images, size=n).astype(np.float64)  # (n, U)
            per_seed = counts @ patterns / images  # (n, S): each seed's mean difference on the drawn images
        else:
            picks = rng.integers(0, images, (n, images)) + (np.arange(n) * images)[:, None]
            counts = np.bincount(picks.ravel(), minlength=n * images).reshape(n, images).astype(np.float64)
            per_seed = counts @ values / images
        stats[start : start + n] = (per_seed * seed_counts[start : start + n]).sum(1) / seeds
    stats *= 100.0
    tail = (1.0 - CONFIDENCE) / 2
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    side = min(int(np.count_nonzero(stats <= 0)), int(np.count_nonzero(stats >= 0)))
    return Bootstrap(float(low), float(high), min(1.0, 2.0 * (1 + side) / (resamples + 1)))


def predicted_half_width(
    *,
    seed_var_measured: float,
    measured_images: int,
    churn: float,
    seeds: int,
    images: int,
    image_discordance: float,
) -> float:
    """The 95% half-width (points) a design of ``seeds`` paired seeds on ``images`` test images should give.

    ``seed_var_measured``: the variance (points^2) over seeds of a paired difference A_s - B_s, measured on a fixed
    test set of ``measured_images``. Part of it is per-image churn: which images a run gets wrong changes from seed
    to seed. If two seeds of a row disagree on whether the answer is right on a fraction ``churn`` of the images,
    each row's error varies by churn / 2 / n over seeds on n images, the difference of two rows by churn / n: it
    shrinks with the test set. The rest is model-level spread, the same on any test set. The bootstrap's image
    resampling adds the variance over images of the per-image difference, at most ``image_discordance / images``
    (the fraction of images on which exactly one of the two rows is wrong).
    Var = (model + churn / images) / seeds + image_discordance / images; half-width = 1.96 sqrt(Var)."""
    churn_var = lambda n: churn / n * 1e4  # points^2
    model_var = max(seed_var_measured - churn_var(measured_images), 0.0)
    var = (model_var + churn_var(images)) / seeds + image_discordance / images * 1e4
    return 1.959964 * math.sqrt(var)


# ------------------------------------------------------------------------------------------------ per-image errors
@dataclass(frozen=True)
class SeedRun:
    """One finished run of a row: its folder, summary.json and method (for the ``head`` column)."""

    seed: int
    run_dir: Path
    summary: dict[str, Any]
    method: str


def run_errors(run: SeedRun, column: str) -> tuple[np.ndarray, np.ndarray] | str:
    """(image_index (N,) sorted, error per image (N,): bool, or a fraction for the branch mean) of a run's column,
    or why there is none ('no per-image predictions', 'predictions.npz is from epoch 3, the run's last is 9', ...)."""
    from okdfast.run.predictions import PREDICTIONS_FILE, read_predictions

    try:
        arrays = read_predictions(run.run_dir)
    except (OSError, ValueError) as error:
        return f"{PREDICTIONS_FILE} unreadable ({error})"
    if arrays is None:
        return "no per-image predictions"
    last_epoch = run.summary.get("last", {}).get("epoch")
    if last_epoch is not None and int(arrays["epoch"]) != int(last_epoch):
        return f"{PREDICTIONS_FILE} is from epoch {int(arrays['epoch'])}, the run's last is {last_epoch}"
    labels = arrays["labels"].astype(np.int64)
    key, metric = _column_keys(column, run.method)
    if key is None:
        return f"{run.method} has no head"
    if key == "branch_mean":
        wrong = (arrays["branches"].astype(np.int64) != labels).mean(0)
    elif key.startswith("branch_"):
        k = int(key.split("_")[1])
        if k >= arrays["branches"].shape[0]:
            return f"no branch {k}"
        wrong = arrays["branches"][k].astype(np.int64) != labels
    elif key in arrays:
        wrong = arrays[key].astype(np.int64) != labels
    else:
        return f"no {column} in {PREDICTIONS_FILE}"
    accuracy = run.summary.get("last", {}).get(metric)
    if accuracy is not None and abs(100.0 * float(np.mean(wrong)) - (100.0 - float(accuracy))) > 100.0 / len(labels):
        return f"{PREDICTIONS_FILE} disagrees with summary.json on {metric}"
    order = np.argsort(arrays["image_index"], kind="stable")
    return arrays["image_index"][order], wrong[order]


def _column_keys(column: str, method: str) -> tuple[str | None, str]:
    """(the key in predictions.npz, or 'branch_mean' / 'branch_<k>'; the summary metric it must agree with)."""
    if column == "head":
        from okdfast.methods import method_class

        head = method_class(method).head_name
        return (f"head_{head}", f"acc_{head}") if head else (None, "")
    if column == "ensemble" or column == "branch_mean" or _BRANCH.match(column):
        return column, f"acc_{column}"
    return f"head_{column}", f"acc_{column}"


# ------------------------------------------------------------------------------------------------- a comparison
@dataclass
class Comparison:
    """Row A against row B (one architecture) in one column; ``status`` is 'ok' or why there are no numbers."""

    row_a: str
    row_b: str
    arch: str
    column: str
    status: str = "ok"
    seeds: list[int] = field(default_factory=list)
    unpaired: list[str] = field(default_factory=list)  # 'mde s3' for each seed only one row has
    images: int = 0
    err_a: float | None = None
    err_b: float | None = None
    diff: float | None = None
    bootstrap: Bootstrap | None = None
    per_seed: list[tuple[int, int, int, float]] = field(default_factory=list)  # (seed, b, c, p)
    pooled: tuple[int, int, float] | None = None  # (b, c, p) summed over the seeds
    p_bootstrap_holm: float | None = None
    p_mcnemar_holm: float | None = None


def compare(row_a: str, row_b: str, arch: str, column: str, runs_a: list[SeedRun], runs_b: list[SeedRun]) -> Comparison:
    """Pairs seed s of A with seed s of B and computes the interval and the tests (Holm comes later, per table)."""
    result = Comparison(row_a, row_b, arch, column)
    by_seed_a, by_seed_b = {r.seed: r for r in runs_a}, {r.seed: r for r in runs_b}
    common = sorted(set(by_seed_a) & set(by_seed_b))
    result.unpaired = [f"{row} s{s}" for row, own, other in ((row_a, by_seed_a, by_seed_b), (row_b, by_seed_b,
                       by_seed_a)) for s in sorted(own) if s not in other]  # fmt: skip
    if not common:
        missing = [row for row, runs in ((row_a, runs_a), (row_b, runs_b)) if not runs]
        result.status = f"not finished ({', '.join(missing)}: no finished seed)" if missing else "no paired seeds"
        return result
    errors: dict[str, list[np.ndarray]] = {row_a: [], row_b: []}
    index = None
    reasons: dict[str, dict[str, list[str]]] = {}  # why -> row -> seeds
    for seed in common:
        for row, run in ((row_a, by_seed_a[seed]), (row_b, by_seed_b[seed])):
            got = run_errors(run, column)
            if isinstance(got, str):
                reasons.setdefault(got, {}).setdefault(row, []).append(f"s{seed}")
                continue
            if index is None:
                index = got[0]
            elif not np.array_equal(index, got[0]):
                reasons.setdefault("tested on other images", {}).setdefault(row, []).append(f"s{seed}")
                continue
            errors[row].append(got[1])
    if reasons:
        result.status = "; ".join(
            f"{why} ({'; '.join(f'{row}: ' + ' '.join(seeds) for row, seeds in who.items())})"
            for why, who in reasons.items()
        )
        return result
    a, b = np.stack(errors[row_a]), np.stack(errors[row_b])
    result.seeds, result.images = common, a.shape[1]
    result.err_a, result.err_b = 100.0 * float(a.mean()), 100.0 * float(b.mean())
    result.diff = result.err_a - result.err_b
    result.bootstrap = paired_bootstrap(a.astype(np.float64) - b.astype(np.float64))
    if a.dtype == bool:
        result.per_seed = [(seed, *mcnemar(a[i], b[i])) for i, seed in enumerate(common)]
        result.pooled = mcnemar(a.ravel(), b.ravel())
    return result


def adjust(comparisons: list[Comparison]) -> None:
    """Holm over the table: the bootstrap p-values as one family, the pooled McNemar p-values as another."""
    with_boot = [c for c in comparisons if c.bootstrap is not None]
    for c, p in zip(with_boot, holm([c.bootstrap.p for c in with_boot])):  # type: ignore[union-attr]
        c.p_bootstrap_holm = p
    with_mcnemar = [c for c in comparisons if c.pooled is not None]
    for c, p in zip(with_mcnemar, holm([c.pooled[2] for c in with_mcnemar])):  # type: ignore[index]
        c.p_mcnemar_holm = p


# ---------------------------------------------------------------------------------------------------- reporting
def _p(p: float | None) -> str:
    if p is None:
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def markdown_lines(comparisons: list[Comparison], label: Any) -> list[str]:
    """The "Paired per-image comparisons" section of results.md; ``label(kind, name)`` names rows and archs."""
    n_boot = sum(c.bootstrap is not None for c in comparisons)
    n_mcnemar = sum(c.pooled is not None for c in comparisons)
    lines = [
        "## Paired per-image comparisons",
        "",
        "Top-1 error of row A minus row B in points (negative: A errs less), on the test images both were tested "
        "on, seed s of A paired with seed s of B (from each run's predictions.npz at its last epoch). **95% CI**: "
        f"paired bootstrap, {RESAMPLES:,} resamples of the seeds and then of the test images, both with replacement "
        f"(numpy default_rng({RNG_SEED}), so this section regenerates exactly); its p-value is two-sided. "
        "**McNemar**: exact two-sided binomial test on the discordant images (b: only A wrong, c: only B wrong), "
        "pooled over the seeds (stratified by seed; it does not see the seed-to-seed spread, the interval does) and "
        f"per seed. **Holm**: each family adjusted over this table's comparisons ({n_boot} bootstrap, {n_mcnemar} "
        f"pooled McNemar p-values); * marks Holm p < {ALPHA:g}. The branch mean is a fraction per image: no McNemar.",
        "",
    ]
    lines += resolution_lines(comparisons)
    header = ["A vs B", "arch", "column", "seeds", "images", "error A", "error B", "A − B [95% CI]",
              "p (bootstrap), Holm", "McNemar pooled b / c, p, Holm", "McNemar per seed p"]  # fmt: skip
    rows = []
    for c in comparisons:
        pair = f"{label('methods', c.row_a)} vs {label('methods', c.row_b)}"
        start = [pair, label("archs", c.arch), column_label(c.column)]
        if c.status != "ok" or c.bootstrap is None:
            rows.append(start + [c.status] + ["—"] * (len(header) - 4))
            continue
        boot = c.bootstrap
        star = lambda p: " *" if p is not None and p < ALPHA else ""
        mc_pooled = "—"
        if c.pooled is not None:
            b, cc, p = c.pooled
            mc_pooled = f"{b} / {cc}, {_p(p)}, {_p(c.p_mcnemar_holm)}{star(c.p_mcnemar_holm)}"
        per_seed = ", ".join(f"s{s} {_p(p)}" for s, _, _, p in c.per_seed) or "—"
        seeds = ", ".join(map(str, c.seeds)) + (f" (unpaired, dropped: {', '.join(c.unpaired)})" if c.unpaired else "")
        rows.append(start + [
            seeds, f"{c.images:,}", f"{c.err_a:.2f}", f"{c.err_b:.2f}",
            f"{_signed(c.diff)} [{_signed(boot.low)}, {_signed(boot.high)}]",  # type: ignore[arg-type]
            f"{_p(boot.p)}, {_p(c.p_bootstrap_holm)}{star(c.p_bootstrap_holm)}", mc_pooled, per_seed,
        ])  # fmt: skip
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    lines.append("")
    return lines


def resolution(comparisons: list[Comparison], column: str = "ensemble") -> tuple[float, float, float] | None:
    """(median, smallest, largest) 95% half-width in points of a column's comparisons; None when none has numbers."""
    widths = sorted(c.bootstrap.half_width for c in comparisons if c.bootstrap is not None and c.column == column)
    if not widths:
        return None
    return float(np.median(widths)), widths[0], widths[-1]


def resolution_lines(comparisons: list[Comparison]) -> list[str]:
    """What the design resolves: per column, the half-width of its 95% intervals (a true difference smaller than
    it is not told from 0; one of about 1.43 times it is found with 80% power)."""
    columns = list(dict.fromkeys(c.column for c in comparisons))
    parts = []
    for column in columns:
        got = resolution(comparisons, column)
        if got is not None:
            median, low, high = got
            spread = f" (range {low:.2f}–{high:.2f} over its comparisons)" if high - low >= 0.005 else ""
            parts.append(f"{column_label(column)} ±{median:.2f} points{spread}")
    if not parts:
        missing = sorted({c.status.split(" (")[0] for c in comparisons if c.status != "ok"})
        return [f"**Resolution**: none measured yet ({'; '.join(missing) or 'no comparisons'}).", ""]
    few = sorted({len(c.seeds) for c in comparisons if c.bootstrap is not None})
    note = " With one seed the intervals cover the test images only, not training seeds." if few[0] == 1 else ""
    return [
        "**Resolution** (the smallest difference this design resolves at 95%: the median half-width of the "
        f"intervals): {'; '.join(parts)}. A true difference of about 1.43 times it is found with 80% power.{note}",
        "",
    ]


CSV_FIELDS = [
    "table", "schedule", "arch", "row_a", "row_b", "column", "status", "seeds", "unpaired", "images", "err_a",
    "err_b", "diff", "ci_low", "ci_high", "half_width", "p_bootstrap", "p_bootstrap_holm", "mcnemar_b",
    "mcnemar_c", "p_mcnemar", "p_mcnemar_holm", "p_mcnemar_per_seed", "resamples", "rng_seed",
]  # fmt: skip


def csv_rows(comparisons: list[Comparison], table: str, schedule: str) -> list[dict[str, Any]]:
    num = lambda v: "" if v is None else f"{v:.4f}"
    rows = []
    for c in comparisons:
        boot = c.bootstrap
        rows.append({
            "table": table, "schedule": schedule, "arch": c.arch, "row_a": c.row_a, "row_b": c.row_b,
            "column": c.column, "status": c.status, "seeds": " ".join(map(str, c.seeds)),
            "unpaired": " ".join(c.unpaired), "images": c.images or "", "err_a": num(c.err_a), "err_b": num(c.err_b),
            "diff": num(c.diff), "ci_low": num(boot and boot.low), "ci_high": num(boot and boot.high),
            "half_width": num(boot and boot.half_width), "p_bootstrap": _csv_p(boot and boot.p),
            "p_bootstrap_holm": _csv_p(c.p_bootstrap_holm), "mcnemar_b": c.pooled[0] if c.pooled else "",
            "mcnemar_c": c.pooled[1] if c.pooled else "", "p_mcnemar": _csv_p(c.pooled and c.pooled[2]),
            "p_mcnemar_holm": _csv_p(c.p_mcnemar_holm),
            "p_mcnemar_per_seed": " ".join(f"s{s}:{_csv_p(p)}" for s, _, _, p in c.per_seed),
            "resamples": RESAMPLES if boot else "", "rng_seed": RNG_SEED if boot else "",
        })  # fmt: skip
    return rows


def _csv_p(p: float | None) -> str:
    return "" if p is None else f"{p:.6g}"
