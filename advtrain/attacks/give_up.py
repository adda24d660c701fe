"""Giving up on points an attack will not break with the work it has left.

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

APGD (Croce & Hein 2020) gives up by a simpler rule (:func:`hopeless_descent`), at its own
checkpoints, for a loss whose zero is the decision boundary (DLR, targeted DLR, the CW margin):
its gains come early (the step starts at ``2 eps`` and only halves), so the average gain per
iteration since the start, carried on to the last iteration, over-estimates what is still to
come; a point further below zero than ``factor`` times that leaves the run at its best point.
The suites' APGD-T uses it for linf (:data:`APGD_FACTOR`), as their Square uses :class:`GiveUp`.

A given-up point is never called adversarial or robust on the strength of this rule: it keeps the
best point the search had found, exactly as a point that used every query keeps its last one. What
the rule can cost is a point the remaining work would have broken; ``bench/give_up.py`` counts
those against full runs on the released models and a ResNet, and the README gives the figures
the defaults were chosen by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import AdvtrainError

#: The suites' ``give_up`` factor for APGD-T (see :func:`hopeless_descent`).
APGD_FACTOR = 8.0


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
        check_factor("give-up factor", self.factor)

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


def hopeless_descent(
    loss_best: Tensor, loss_start: Tensor, done: int, steps: int, factor: float
) -> Tensor:
    """Which points of a descent to give up after ``done`` of ``steps`` iterations: those whose
    best loss is further below zero than ``factor`` times the gain since the start
    (``loss_start``) carried on at its average rate for the iterations left."""
    to_come = (loss_best - loss_start).clamp_min(0) * ((steps - done) / done)
    return (loss_best < 0) & (-loss_best > factor * to_come)


def check_factor(name: str, value: object) -> None:
    """A give-up factor: a positive, finite number (or None, checked by the caller)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdvtrainError(f"{name} must be a positive number or None, got {value!r}")
    if not value > 0 or math.isinf(value):
        raise AdvtrainError(f"{name} must be positive and finite, got {value!r}")
