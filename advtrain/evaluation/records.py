"""What a cascade leaves for the report: its per-sample rows and its feasibility figures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..threat import ThreatModel
from .cascade import Cascade


def feasibility(
    threat: ThreatModel, cascades: Sequence[Cascade], borrowed: str | None = None
) -> dict[str, Any] | None:
    """The report's ``feasibility`` entry: the adversarial points the cascades counted as they
    broke (those of the step ``borrowed``, taken from another cascade, once), how many satisfy
    ``threat.constraints``, the outputs refused (in all and per step), and the constraint set;
    None without constraints and refusals."""
    constraints = threat.constraints
    refused: dict[str, int] = {}
    for cascade in cascades:
        for name, count in cascade.refused.items():
            refused[name] = refused.get(name, 0) + count
    if constraints is None and not refused:
        return None
    count, feasible_count = 0, 0
    for cascade in cascades:
        for name, (counted, ok) in cascade.feasible.items():
            if name != borrowed:
                count, feasible_count = count + counted, feasible_count + ok
    feasible = feasible_count if count and constraints is not None else None
    return {
        "adversarial_points": count,
        "feasible": feasible,
        "feasible_share": None if feasible is None or not count else feasible / count,
        "refused": sum(refused.values()),
        "refused_by_step": refused,
        "constraints": None if constraints is None else constraints.describe(),
    }


def per_sample_records(
    state: Cascade,
    labels: Tensor,
    clean_pred: Tensor,
    adv_pred: Tensor,
    min_norms: Tensor | None,
    attackable: Tensor | None,
) -> list[dict[str, Any]]:
    """The report's ``per_sample`` rows: label, predictions, what broke the point and how far
    it moved, its minimum-norm margin (None where none was measured), and, when only some
    classes were attacked (``attackable`` given), whether it was."""
    return [
        {
            "index": i,
            "label": int(labels[i]),
            "clean_pred": int(clean_pred[i]),
            "adv_pred": int(adv_pred[i]),
            "broken_by": state.broken_by[i],
            "perturbation_norm": float(state.norm[i])
            if state.broken_by[i] not in (None, "clean")
            else None,
            "min_norm": None if min_norms is None else float(min_norms[i]),
            **({} if attackable is None else {"attacked": bool(attackable[i])}),
        }
        for i in range(len(labels))
    ]
