"""Losses as pure functions of logits, per sample (no reduction).

Attacks maximise these; training methods average them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .errors import AdvtrainError


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy of ``logits`` against labels ``y``."""
    return F.cross_entropy(logits, y, reduction="none")


def cw_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini & Wagner's margin: the best other logit minus the true one (> 0 means misclassified).

    Carlini & Wagner, "Towards evaluating the robustness of neural networks" (S&P 2017), loss f6
    with confidence 0.
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.amax(dim=1) - true


def dlr(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio, untargeted: ``-(z_y - max_{i!=y} z_i) / (z_(1) - z_(3))``.

    Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks" (ICML 2020), eq. 5; ``z_(k)`` is the k-th largest logit. Invariant to
    shifting and rescaling the logits, so saturated or rescaled outputs cannot hide a weakness.
    """
    ordered = logits.sort(dim=1, descending=True).values
    margin = logits.gather(1, y[:, None]).squeeze(1) - logits.scatter(
        1, y[:, None], float("-inf")
    ).amax(dim=1)
    return -margin / (ordered[:, 0] - ordered[:, min(2, logits.shape[1] - 1)] + 1e-12)


def dlr_targeted(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Targeted DLR: ``-(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2)`` (Croce & Hein 2020, eq. 6)."""
    ordered = logits.sort(dim=1, descending=True).values
    last = logits.shape[1] - 1
    scale = ordered[:, 0] - (ordered[:, min(2, last)] + ordered[:, min(3, last)]) / 2
    true = logits.gather(1, y[:, None]).squeeze(1)
    wanted = logits.gather(1, target[:, None]).squeeze(1)
    return -(true - wanted) / (scale + 1e-12)


def other_classes(logits: Tensor, y: Tensor, count: int) -> Tensor:
    """The ``count`` classes other than ``y`` ranked most likely by ``logits``, shape (n, count)."""
    ranked = logits.argsort(dim=1, descending=True)
    others = ranked[ranked != y[:, None]].reshape(len(y), -1)
    return others[:, :count]


LOSSES = {"ce": cross_entropy, "cw": cw_margin, "dlr": dlr}


def check_loss(name: str) -> str:
    """``name`` if it names a loss of :data:`LOSSES`, else a one-line AdvtrainError."""
    if name not in LOSSES:
        raise AdvtrainError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    return name


def attack_objective(logits: Tensor, y: Tensor, target: Tensor | None, loss: str = "ce") -> Tensor:
    """What an attack ascends: the loss of the true label, or a loss that rewards the target."""
    if target is None:
        return LOSSES[loss](logits, y)
    if loss == "dlr":
        return dlr_targeted(logits, y, target)
    return -LOSSES[loss](logits, target)


def is_adversarial(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Per-sample success: predicted label differs from ``y`` (or equals ``target``)."""
    pred = logits.argmax(dim=1)
    return pred != y if target is None else pred == target


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of samples whose predicted label equals ``y``."""
    return float((logits.argmax(dim=1) == y).float().mean()) if len(y) else float("nan")


__all__ = [
    "LOSSES",
    "accuracy",
    "attack_objective",
    "check_loss",
    "cross_entropy",
    "cw_margin",
    "dlr",
    "dlr_targeted",
    "is_adversarial",
    "other_classes",
]
