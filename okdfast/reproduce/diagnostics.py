"""The "Mechanism diagnostics" section of results.md: what each mechanism acts on, per row of a table, at the last
epoch (mean ± sample std over the finished seeds), so that a row and its ablation compare the quantity the
mechanism is meant to move (issue 19; the keys are logged by okdfast.run.scoring and okdfast.methods, and
okdfast.plot draws them per epoch).
"""

from __future__ import annotations

import statistics
from typing import Any

# (summary key, column header, digits): test-set measures first, then the training loss' shares and the weights
COLUMNS = (
    ("disagreement", "disagreement (aux.)", 4),
    ("diversity_kl", "KL (aux.)", 4),
    ("disagreement_all", "disagreement (all)", 4),
    ("aux_corr", "aux_corr", 4),
    ("classifier_abscos", "classifiers' abs cos", 3),
    ("share_cd", "CD share", 4),
    ("cd_grad_ratio", "CD / task grad", 3),
    ("attention_entropy", "attention entropy", 3),
    ("attention_on_correct", "attn. on correct", 4),
    ("attention_on_wrong", "attn. on wrong", 4),
    ("attention_self", "attn. on itself", 3),
    ("target_gain", "target gain (pts)", 2),
)


def _cell(values: list[float], digits: int) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def diagnostics_lines(results: list[Any], label: Any) -> list[str]:
    """Markdown lines (empty when no finished run logs a diagnostic); ``results``: the table's CellResults,
    ``label(kind, name)`` names rows and archs."""
    rows = [r for r in results if r.finished]
    present = [c for c in COLUMNS if any(c[0] in run.summary.get("last", {}) for r in rows for run in r.finished)]
    if not present:
        return []
    lines = [
        "## Mechanism diagnostics",
        "",
        "At the last epoch, mean ± sample std over the finished seeds (one value: one seed). On the test set: "
        "disagreement (fraction of images on which two branches' argmax differ, mean over pairs; aux.: among the "
        "auxiliaries, all: among all branches), KL (mean pairwise KL(p_j || p_k), T = 1), aux_corr (the auxiliaries' "
        "non-target correlation, what CD nontarget_corr lowers; logged whatever the CD form and weight), the FFM "
        "attention's entropy / log(K-1) (1: uniform) and its mean weight on an auxiliary that is right or wrong on "
        "the image (attn. on itself, with per-auxiliary rows: the weight a row gives its own auxiliary, 1/3 "
        "uniform), and target gain (acc of the FFM target minus acc of the auxiliaries' ensemble, points). From "
        "training: CD share (lambda * L_cd over the total loss, epoch mean), CD / task grad (norm of CD's gradient "
        "over the task's on the auxiliary classifiers). Weights: the auxiliary classifiers' mean |cos|.",
        "",
    ]
    header = ["row", "arch", "seeds"] + [c[1] for c in present]
    body = []
    for r in rows:
        cells = [label("methods", r.cell.method), label("archs", r.cell.arch), str(len(r.finished))]
        for key, _, digits in present:
            values = [float(v) for run in r.finished if (v := run.summary.get("last", {}).get(key)) is not None]
            cells.append(_cell(values, digits))
        body.append(cells)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    lines.append("")
    return lines
