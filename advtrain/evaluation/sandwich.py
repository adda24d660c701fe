"""Certified robustness beside the attacks: the sandwich of a proven lower bound and an attacked
upper bound on robust accuracy, and randomized smoothing's certificates of the smoothed model.

An attack that breaks a point proves the model is not robust there; bound propagation that
verifies a point (:func:`advtrain.certify.verify`: every margin ``z_y - z_c`` has a positive lower
bound over the whole threat model) proves it is. Each correctly classified point is decided by
one side or left open:

- ``"verified"``: the bound proves it robust (it counts in both accuracies);
- ``"attack"``: an attack broke it (in neither);
- ``"open"``: neither; the gap between the two accuracies is the share of these points;
- ``"misclassified"``: wrong on the clean input already.

So verified accuracy <= robust accuracy always, and a point both verified and broken means one of
the two is wrong: the evaluation stops with an error naming the point, never reports it.

Randomized smoothing (Cohen, Rosenfeld & Kolter 2019, :class:`advtrain.certify.Smoothed`)
certifies a *different* classifier, the smoothed one: its figures are reported beside the
sandwich, labelled as the smoothed model's, and never mixed into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.counting import uncounted
from ..certify import (
    BOUND_METHODS,
    Certificate,
    Smoothed,
    certified_accuracy,
    max_certifiable_radius,
    verify,
)
from ..certify.input_set import check_threat
from ..certify.network import parse
from ..errors import AdvtrainError
from ..threat import ThreatModel
from .cascade import Cascade
from .context import EvalContext

#: The l2 radii at which the smoothed model's certified accuracy is reported, with the threat's.
SMOOTHING_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Cohen et al.'s selection samples and failure probability.
SMOOTHING_N0, SMOOTHING_ALPHA = 100, 0.001

__all__ = [
    "SMOOTHING_RADII",
    "Sandwich",
    "add_certificates",
    "certify_method",
    "check_certifiable",
    "check_sigma",
    "sandwich",
    "smoothing_figures",
    "summary_of",
]


def certify_method(certify: bool | str | None) -> str | None:
    """The bound method ``evaluate(certify=...)`` asks for: ``True`` is ``"crown"``, a name is
    checked against :data:`advtrain.certify.BOUND_METHODS`, ``False``/None is none."""
    if certify is None or certify is False:
        return None
    if certify is True:
        return "crown"
    if isinstance(certify, str) and certify in BOUND_METHODS:
        return certify
    raise AdvtrainError(
        f"certify must be True, False or one of {', '.join(BOUND_METHODS)}; got {certify!r}"
    )


def check_sigma(sigma: object) -> float:
    """The smoothing noise level: a finite number > 0 (input units, e.g. [0, 1] pixels)."""
    try:
        value = float(sigma)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise AdvtrainError(f"smoothing_sigma must be a number, got {sigma!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise AdvtrainError(f"smoothing_sigma must be a finite number > 0, got {sigma!r}")
    return value


def check_certifiable(model: nn.Module, threat: ThreatModel) -> None:
    """A one-line :class:`AdvtrainError` before any work when bound propagation cannot run on
    ``model`` (a layer it does not support, named) or ``threat`` (l1, feature constraints)."""
    check_threat(threat)
    parse(uncounted(model)[0])


@dataclass(frozen=True)
class Sandwich:
    """Verified accuracy (lower bound) <= robust accuracy under the attacks (upper bound).

    ``decided`` holds per point ``"verified"``, ``"attack"``, ``"open"`` or ``"misclassified"``;
    ``margin_bound`` the lower bound of its smallest margin ``min_c z_y - z_c`` (``-inf`` where it
    was not computed)."""

    method: str
    verified_accuracy: float
    robust_accuracy: float
    decided: list[str]
    margin_bound: list[float]

    @property
    def gap(self) -> float:
        """Robust minus verified accuracy: the share of points neither side decided."""
        return self.robust_accuracy - self.verified_accuracy

    def to_dict(self) -> dict[str, Any]:
        counts = {side: self.decided.count(side) for side in SIDES}
        return {
            "method": self.method,
            "verified_accuracy": self.verified_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "gap": self.gap,
            "decided_by": counts,
            "meaning": "verified accuracy is a proven lower bound on the model's robust accuracy "
            "in this threat model; the robust accuracy under the attacks is an upper bound",
        }


SIDES = ("verified", "attack", "open", "misclassified")


def sandwich(ctx: EvalContext, state: Cascade, correct: Tensor, method: str) -> Sandwich:
    """Verify every point by ``method`` (``"ibp"``, ``"crown-ibp"`` or ``"crown"``), a chunk at a
    time, and set it beside what the attacks found.

    Raises:
        AdvtrainError: a point is verified and broken by an attack (one of the two is wrong).
    """
    model = uncounted(ctx.model)[0]
    verified = torch.zeros(len(ctx.x), dtype=torch.bool)
    bound = torch.full((len(ctx.x),), -math.inf)
    for rows in ctx.x.chunks(ctx.batch_size):
        x, y = ctx.x[rows], ctx.y[rows].to(ctx.x.device)
        found = verify(model, x, y, ctx.threat, method=method)
        verified[rows] = found.verified.cpu()
        others = found.margins.cpu().scatter(1, y.cpu().reshape(-1, 1), math.inf)
        bound[rows] = others.min(1).values
    broken_by = state.broken_by
    decided = []
    for i, (proven, by) in enumerate(zip(verified.tolist(), broken_by)):
        attacked = by not in (None, "clean")
        if proven and attacked:
            raise AdvtrainError(
                f"point {i} is verified by {method} (smallest margin bound "
                f"{float(bound[i]):.4g} > 0) and broken by {by}: one of the two is wrong, so "
                "the evaluation stops instead of reporting it"
            )
        if not bool(correct[i]):
            decided.append("misclassified")
        else:
            decided.append("verified" if proven else "attack" if attacked else "open")
    proven = torch.tensor([side == "verified" for side in decided], dtype=torch.bool)
    return Sandwich(
        method=method,
        # a float32 mean, as the cascade's robust accuracy, so that equal counts compare equal
        verified_accuracy=float(proven.float().mean()) if decided else float("nan"),
        robust_accuracy=state.robust_accuracy,
        decided=decided,
        margin_bound=bound.tolist(),
    )


def smoothing_figures(ctx: EvalContext, sigma: float, samples: int) -> dict[str, Any]:
    """Randomized smoothing's certificates (Cohen et al. 2019: ``n0`` = 100 selection samples,
    ``samples`` estimation samples, alpha = 0.001) of the smoothed model ``g`` built on the
    model at noise ``sigma``, for every point, a chunk at a time, and its certified accuracy at
    the l2 radii of :data:`SMOOTHING_RADII` (and the threat's eps for an l2 threat). They belong
    to ``g``, not to the model the attacks ran on."""
    model = uncounted(ctx.model)[0]
    smoothed = Smoothed(model, sigma, n_classes=ctx.n_classes, seed=ctx.seed)
    parts = [
        smoothed.certify(ctx.x[rows], n0=SMOOTHING_N0, n=samples, alpha=SMOOTHING_ALPHA)
        for rows in ctx.x.chunks(ctx.batch_size)
    ]
    merged = Certificate(
        **{
            name: torch.cat([getattr(part, name) for part in parts])
            for name in ("prediction", "radius", "abstained", "counts", "selection_counts")
        },
        pA_lower=torch.cat([part.pA_lower for part in parts]),
        settings=parts[0].settings,
    )
    radii = sorted(set(SMOOTHING_RADII) | ({ctx.threat.eps} if ctx.threat.norm == "l2" else set()))
    found = certified_accuracy(merged, ctx.y.cpu(), radii)
    return {
        "classifier": f"the smoothed model g(x) = argmax_c P(f(x + N(0, {sigma:g}^2 I)) = c), "
        "not the model the attacks ran on",
        "sigma": sigma,
        "n0": SMOOTHING_N0,
        "n": samples,
        "alpha": SMOOTHING_ALPHA,
        "certified_accuracy_l2": {f"{r:g}": a for r, a in zip(found.radii, found.accuracy)},
        "abstained": found.abstained,
        "largest_certifiable_radius": max_certifiable_radius(sigma, samples, SMOOTHING_ALPHA),
        "prediction": merged.prediction.tolist(),
        "radius": merged.radius.tolist(),
    }


def summary_of(smoothing: dict[str, Any]) -> dict[str, Any]:
    """The report's ``smoothing`` figures: everything but the per-point lists."""
    return {k: v for k, v in smoothing.items() if k not in ("prediction", "radius")}


def add_certificates(
    per_sample: list[dict[str, Any]],
    certified: Sandwich | None,
    smoothing: dict[str, Any] | None,
) -> None:
    """Per point, in place: which side of the sandwich decided it (``certified``) and its
    smallest margin's lower bound (``margin_bound``); the smoothed model's prediction
    (``smoothed_prediction``, -1: abstained) and certified l2 radius (``smoothed_radius``)."""
    for i, record in enumerate(per_sample):
        if certified is not None:
            record["certified"] = certified.decided[i]
            record["margin_bound"] = certified.margin_bound[i]
        if smoothing is not None:
            record["smoothed_prediction"] = smoothing["prediction"][i]
            record["smoothed_radius"] = smoothing["radius"][i]
