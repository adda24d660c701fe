"""Losses as pure functions of logits, per sample (no reduction).

Attacks maximise these; training methods average them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


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


LOSSES = {"ce": cross_entropy, "cw": cw_margin}


def attack_objective(logits: Tensor, y: Tensor, target: Tensor | None, loss: str = "ce") -> Tensor:
    """What an attack ascends: the loss of the true label, or minus the loss of the target."""
    fn = LOSSES[loss]
    if target is None:
        return fn(logits, y)
    return -fn(logits, target)


def is_adversarial(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Per-sample success: predicted label differs from ``y`` (or equals ``target``)."""
    pred = logits.argmax(dim=1)
    return pred != y if target is None else pred == target


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of samples whose predicted label equals ``y``."""
    return float((logits.argmax(dim=1) == y).float().mean()) if len(y) else float("nan")


__all__ = ["cross_entropy", "cw_margin", "attack_objective", "is_adversarial", "accuracy", "LOSSES"]
