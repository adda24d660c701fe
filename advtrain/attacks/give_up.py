"""Giving up on points a score-based search will not break with the queries it has left.

A3 (Liu et al., "Practical evaluation of adversarial robustness via adaptive auto attack", CVPR
2022) spends an attack's budget where it can still pay off and drops the points it judges
hopeless. :class:`GiveUp` makes that judgement for Square's untargeted margin loss (the best other
logit minus the true one; the point is adversarial once it is positive) from each point's own
progress, at a few checkpoints of the run:

- at checkpoint ``q`` (queries used), the gain of the point's best margin since query
  ``q0 = (1 - window) * q`` is taken as what one stretch of ``ln(q / q0)`` in log-queries buys;
- Square's window shrinks by halvings on a fixed schedule, so its gains come about evenly per
  doubling of the queries: the gain still to come by the last query ``N`` is extrapolated as
  ``gain * ln(N / q) / ln(q / q0)``;
- a point whose margin is further below zero than ``factor`` times that extrapolated gain is
  given up: its best point and margin so far are its result, and it uses no more queries.

A given-up point is never called adversarial or robust on the strength of this rule: it keeps the
best point the search had found, exactly as a point that used every query keeps its last one. What
the rule can cost is a point the remaining queries would have broken; ``bench/square_give_up.py``
counts those against the full search on the released models, and the README gives the figures
the defaults were chosen by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import AdvtrainError


@dataclass(frozen=True)
class GiveUp:
    """When a random search gives up on a point (see the module's docstring).

    Attributes:
        checkpoints: the fractions of the query budget at which points are judged, increasing,
            each in (0, 1).
        window: the share of the queries used by a checkpoint whose gain is extrapolated, in
            (0, 1).
        factor: how many times the extrapolated gain the margin's distance to zero must exceed
            for the point to be given up (more is more cautious).
    """

    checkpoints: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8)
    window: float = 0.75
    factor: float = 16.0

    def __post_init__(self) -> None:
        marks = tuple(self.checkpoints)
        if not marks or any(not 0 < f < 1 for f in marks) or list(marks) != sorted(set(marks)):
            raise AdvtrainError(
                f"give-up checkpoints must be increasing fractions in (0, 1), got {marks!r}"
            )
        if not 0 < self.window < 1:
            raise AdvtrainError(f"give-up window must be in (0, 1), got {self.window!r}")
        if not self.factor > 0 or math.isinf(self.factor):
            raise AdvtrainError(f"give-up factor must be positive and finite, got {self.factor!r}")

    def watch(self, n_queries: int, n_points: int, device: torch.device) -> ProgressWatch:
        """The watch over one search of ``n_points`` points with ``n_queries`` queries each."""
        return ProgressWatch(self, n_queries, n_points, device)


class ProgressWatch:
    """The margins of one search's points at the queries its checkpoints look back to, and the
    verdict at each checkpoint. Rows are the batch's (``index`` maps the search's rows to them),
    so the search may drop points between calls; nothing is read back to the host."""

    def __init__(self, rule: GiveUp, n_queries: int, n_points: int, device: torch.device) -> None:
        self.rule, self.n_queries = rule, n_queries
        self.checks: dict[int, int] = {}  # checkpoint query -> the query it looks back to
        for fraction in rule.checkpoints:
            q = round(fraction * n_queries)
            q0 = round((1 - rule.window) * q)
            if 2 <= q0 < q < n_queries:  # the clean check and the start come first
                self.checks[q] = q0
        self.kept: dict[int, Tensor] = {
            q0: torch.full((n_points,), float("-inf"), device=device)
            for q0 in set(self.checks.values())
        }

    def after(self, used: int, index: Tensor, margin: Tensor, active: Tensor) -> Tensor | None:
        """After the query that brings every point to ``used`` queries: keep the margins
        (``margin`` of the batch rows ``index``) a later checkpoint looks back to, and at a
        checkpoint return which rows to give up (``None`` elsewhere)."""
        if used in self.kept:
            self.kept[used][index] = margin
        if used not in self.checks:
            return None
        q0 = self.checks[used]
        gain = (margin - self.kept[q0][index]).clamp_min(0)
        still = math.log(self.n_queries / used) / math.log(used / q0)
        return active & (-margin > self.rule.factor * gain * still)
