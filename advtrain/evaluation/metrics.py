"""Robustness metrics as pure functions of labels, predictions, logits and perturbation norms.

Definitions (``n`` inputs, ``y`` their labels, ``p`` predicted probabilities, ``z`` logits):

- clean / adversarial accuracy: ``mean(pred == y)`` on clean inputs / on the worst-case
  adversarial input of each point (a point misclassified when clean counts as broken).
- robustness score: the harmonic mean of clean accuracy ``a`` and robust accuracy ``r``,
  ``2 a r / (a + r)`` (0 when both are 0): high only when both are.
- robust margin of a point: the smallest perturbation norm, found by a minimum-norm attack, that
  changes its prediction (0 for a point misclassified when clean, ``inf`` when none was found).
- accuracy at eps: ``mean(correct and margin > eps)``, made consistent with attacks run at fixed
  radii (a point broken at ``eps_k`` counts as broken at every ``eps >= eps_k``).
- adversarial radius: the largest eps of that curve at which accuracy is at least
  ``threshold`` times the clean accuracy.
- defensive entropy: mean predictive entropy ``-sum_c p_c log p_c`` (nats).
- defensive margin: mean true-class probability ``p_y`` and logit margin
  ``z_y - max_{c != y} z_c`` (negative when misclassified).
- precision, recall, F1 per class and their unweighted (macro) mean, from scikit-learn.
- positive-class score of a point: the logit margin of the positive class ``p``,
  ``z_p - max_{c != p} z_c``; with two classes it is the log-odds of ``p``, so it ranks the points
  exactly as the softmax probability does.
- positive-class recall, precision (from the predicted labels), PR-AUC (average precision) and
  ROC-AUC (from the scores), from scikit-learn; an AUC needs both kinds of point (else None).
- threshold at a false-positive rate ``f``: the smallest threshold ``t`` with at most
  ``floor(f * negatives)`` clean negatives scoring ``>= t``, placed halfway between the score it
  must exceed and the next higher clean score, so that no clean point sits on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .report import ClassMetrics


def entropy(logits: Tensor) -> Tensor:
    """Per-sample predictive entropy (nats) of ``softmax(logits)``."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def true_class_probability(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample probability given to the true class."""
    return F.softmax(logits.float(), dim=1).gather(1, y[:, None]).squeeze(1)


def logit_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample ``z_y - max_{c != y} z_c``: positive when correct, its size the confidence."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return (true - others).float()


def defensive_margins(clean: Tensor, adversarial: Tensor, y: Tensor) -> dict[str, float]:
    """The report's ``defensive_margin``: mean true-class probability and logit margin of the
    logits ``clean`` and ``adversarial`` (NaN with no point)."""

    def mean(values: Tensor) -> float:
        return float(values.mean()) if len(values) else float("nan")

    return {
        "clean_true_probability": mean(true_class_probability(clean, y)),
        "adversarial_true_probability": mean(true_class_probability(adversarial, y)),
        "clean_logit_margin": mean(logit_margin(clean, y)),
        "adversarial_logit_margin": mean(logit_margin(adversarial, y)),
    }


def classification_metrics(y: Tensor, pred: Tensor, n_classes: int) -> dict[str, object]:
    """Per-class precision, recall, F1 and support, and their macro average."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y.cpu().numpy(), pred.cpu().numpy(), labels=labels, zero_division=0
    )
    per_class = {
        c: ClassMetrics(float(precision[c]), float(recall[c]), float(f1[c]), int(support[c]))
        for c in labels
    }
    macro = ClassMetrics(
        float(precision.mean()), float(recall.mean()), float(f1.mean()), int(support.sum())
    )
    return {"per_class": per_class, "macro": macro}


def accuracy_vs_eps(
    margins: Tensor,
    correct: Tensor,
    grid: Sequence[float],
    broken_at: Sequence[tuple[float, Tensor]] = (),
) -> list[tuple[float, float]]:
    """Accuracy at each eps of ``grid``: a point counts when clean-correct, its margin is above
    eps, and no attack at a radius ``eps_k <= eps`` broke it (``broken_at``: ``(eps_k, mask)``)."""
    curve = []
    n = max(len(correct), 1)
    for eps in grid:
        standing = correct & (margins > eps)
        for radius, broken in broken_at:
            if radius <= eps + 1e-12:
                standing &= ~broken
        curve.append((float(eps), float(standing.sum()) / n))
    return curve


def adversarial_radius(
    curve: Sequence[tuple[float, float]], clean_accuracy: float, threshold: float = 0.5
) -> float | None:
    """The largest eps at which accuracy is at least ``threshold * clean_accuracy``, before the
    curve first drops below it (``None`` when even the smallest eps is below)."""
    radius = None
    for eps, accuracy in sorted(curve):
        if accuracy + 1e-12 < threshold * clean_accuracy:
            break
        radius = eps
    return radius


def eps_grid(eps: float, margins: Tensor, points: int = 21) -> list[float]:
    """Radii for the accuracy-versus-eps curve: 0 to at least twice ``eps`` (and past the
    largest finite margin, capped at 4 eps), evenly spaced, ``eps`` itself included."""
    finite = margins[torch.isfinite(margins)]
    top = 2 * eps
    if len(finite):
        top = max(top, min(float(finite.max()), 4 * eps))
    if not math.isfinite(top) or top <= 0:
        top = 1.0
    grid = sorted({round(top * i / (points - 1), 10) for i in range(points)} | {float(eps)})
    return grid


def margin_summary(margins: Tensor, correct: Tensor, bins: int = 20) -> dict[str, object]:
    """Median, mean, fraction found and a ``bins``-bin histogram (0 to the largest) of the finite
    margins of the clean-correct points."""
    values = margins[correct]
    finite = values[torch.isfinite(values)]
    summary: dict[str, object] = {
        "median": float(values.median()) if len(values) else None,
        "mean": float(finite.mean()) if len(finite) else None,
        "found": float(torch.isfinite(values).float().mean()) if len(values) else None,
        "n": len(values),
    }
    if len(finite):
        top = float(finite.max())
        top = top if top > 0 else 1.0
        counts = torch.histc(finite.float(), bins=bins, min=0.0, max=top)
        edges = [top * i / bins for i in range(bins + 1)]
        summary["histogram"] = {"edges": edges, "counts": [int(c) for c in counts]}
    else:
        summary["histogram"] = {"edges": [], "counts": []}
    return summary


def positive_score(logits: Tensor, positive: int) -> Tensor:
    """Per-sample score of class ``positive``: ``z_p - max_{c != p} z_c`` (for two classes the
    log-odds of ``p``)."""
    y = torch.full((len(logits),), int(positive), dtype=torch.int64, device=logits.device)
    return logit_margin(logits, y)


def positive_class_metrics(
    y: Tensor, pred: Tensor, scores: Tensor, positive: int
) -> dict[str, float | int | None]:
    """Recall, precision (``pred == positive``), PR-AUC (average precision) and ROC-AUC
    (``scores``) of class ``positive`` against ``y``; an undefined figure is None."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    truth = (y.cpu() == positive).numpy()
    flagged = (pred.cpu() == positive).numpy()
    score = scores.detach().cpu().double().numpy()
    positives, hits, raised = int(truth.sum()), int((truth & flagged).sum()), int(flagged.sum())
    both = 0 < positives < len(truth)
    return {
        "recall": hits / positives if positives else None,
        "precision": hits / raised if raised else None,
        "pr_auc": float(average_precision_score(truth, score)) if both else None,
        "roc_auc": float(roc_auc_score(truth, score)) if both else None,
        "positives": positives,
        "flagged": raised,
    }


def threshold_at_fpr(scores: Tensor, negative: Tensor, fpr: float) -> float:
    """The threshold on ``scores`` (flag a point when its score is ``>= t``) that keeps the
    false-positive rate over the points ``negative`` (bool) at or below ``fpr``: at most
    ``floor(fpr * negatives)`` of them flagged, and no lower threshold does as well. Placed
    halfway between the highest negative score that must stay unflagged and the next higher
    score of any point (one above the highest score when there is none)."""
    values = scores.detach().cpu().double()
    negatives = values[negative.cpu()].sort(descending=True).values
    if not len(negatives):
        raise ValueError("a threshold at a false-positive rate needs negative points")
    allowed = math.floor(fpr * len(negatives) + 1e-9)
    if allowed >= len(negatives):
        return float(values.min()) - 1.0
    bar = float(negatives[allowed])  # this score and every lower one must stay unflagged
    above = values[values > bar]
    return (bar + float(above.min())) / 2 if len(above) else bar + 1.0
