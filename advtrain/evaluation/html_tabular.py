"""The report page's sections for binary, imbalanced and constrained tabular evaluations: the
losses that ran and those skipped (DLR with two classes), the positive class's figures clean and
attacked with its recall at a fixed false-positive rate, and the feasibility line.

Each returns an empty string when the report has nothing of the kind, so pages of other
evaluations stay as they were.
"""

from __future__ import annotations

import json
from typing import Any

from .html_format import DASH, escape, metric, number, percent, table

__all__ = ["feasibility_line", "losses_note", "positive_section"]


def losses_note(losses: dict[str, Any]) -> str:
    """The losses that ran, and those skipped with the reason."""
    used = losses.get("used") or []
    skipped = losses.get("skipped") or {}
    if not used and not skipped:
        return ""
    parts = ["Losses used: " + metric("losses:used", ", ".join(map(str, used)) or DASH, "span", "")]
    parts += [
        f"{escape(name)}: " + metric(f"losses:skipped:{name}", str(why), "span", "")
        for name, why in skipped.items()
    ]
    return "<p class='note'>" + ". ".join(parts) + ".</p>"


def feasibility_line(d: dict[str, Any]) -> str:
    """One line: how many adversarial points satisfy every constraint, the refused outputs,
    and the constraint set (in a fold)."""
    feasibility = d.get("feasibility")
    if not feasibility:
        return ""
    count = feasibility.get("adversarial_points")
    share = feasibility.get("feasible_share")
    line = (
        "Feasibility: "
        + metric("feasibility:feasible_share", percent(share), "span", "")
        + " of "
        + metric("feasibility:adversarial_points", number(count), "span", "")
        + " adversarial points satisfy every constraint; "
        + metric("feasibility:refused", number(feasibility.get("refused")), "span", "")
        + " attack outputs refused as outside the threat model"
    )
    by_step = feasibility.get("refused_by_step") or {}
    if by_step:
        line += (
            " (" + ", ".join(f"{escape(k)}: {escape(number(v))}" for k, v in by_step.items()) + ")"
        )
    constraints = feasibility.get("constraints")
    fold = ""
    if constraints is not None:
        text = json.dumps(constraints, indent=1, sort_keys=True)
        fold = (
            "<details><summary>constraint set</summary>"
            f'<pre data-metric="feasibility:constraints">{escape(text)}</pre></details>'
        )
    else:
        line += "; no feature constraints"
    return f"<p class='note feasibility'>{line}.</p>{fold}"


POSITIVE_FIGURES = (
    ("recall", "recall"),
    ("precision", "precision"),
    ("pr_auc", "PR-AUC (average precision)"),
    ("roc_auc", "ROC-AUC"),
)


def positive_section(d: dict[str, Any]) -> str:
    """The positive class's recall, precision, PR-AUC and ROC-AUC clean and attacked, and its
    recall at the operating point of a fixed false-positive rate."""
    figures = d.get("positive_metrics")
    if not figures:
        return ""
    clean, attacked = figures.get("clean") or {}, figures.get("attacked") or {}
    rows = [
        f"<tr><td>{escape(label)}</td>"
        + metric(f"positive:clean:{key}", percent(clean.get(key)))
        + metric(f"positive:attacked:{key}", percent(attacked.get(key)))
        + "</tr>"
        for key, label in POSITIVE_FIGURES
    ]
    at = figures.get("at_fpr") or {}
    if at.get("threshold") is not None:
        rows.append(
            f"<tr><td>recall at false-positive rate \u2264 {escape(number(at.get('fpr')))}</td>"
            + metric("positive:at_fpr:recall_clean", percent(at.get("recall_clean")))
            + metric("positive:at_fpr:recall_attacked", percent(at.get("recall_attacked")))
            + "</tr>"
        )
    note = (
        f"Class {escape(figures.get('positive_class'))}. Scores: {escape(figures.get('score'))}; "
        "attacked scores are those of each point's adversarial example (its clean score where "
        "no attack broke it or it was not attacked)."
    )
    if at.get("threshold") is not None:
        note += (
            " Operating point: threshold "
            + metric("positive:at_fpr:threshold", number(at.get("threshold")), "span", "")
            + ", clean false-positive rate "
            + metric("positive:at_fpr:clean_fpr", percent(at.get("clean_fpr")), "span", "")
            + f"; {escape(at.get('method'))}."
        )
    elif at.get("note"):
        note += f" {escape(at['note'])}."
    return (
        "<h2>Positive class</h2>"
        + f"<p class='note'>{note}</p>"
        + table(("figure", "clean", "attacked"), rows)
    )
