"""Clean and adversarial accuracy: the two numbers every other metric builds on."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..attacks import Attack, frozen
from ..attacks.base import model_device
from ..errors import AdvtrainError


def predict(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """Predicted labels, in batches, with the model in eval mode (its mode is restored)."""
    device = model_device(model, default=x.device)
    with frozen(model), torch.no_grad():
        labels = [
            model(x[i : i + batch_size].to(device)).argmax(dim=1).to(x.device)
            for i in range(0, len(x), batch_size)
        ]
    return torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64, device=x.device)


@dataclass(frozen=True)
class AccuracyPair:
    """Clean accuracy and accuracy under one attack, over ``n`` samples."""

    clean_accuracy: float
    robust_accuracy: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def clean_and_robust_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, attack: Attack, batch_size: int = 1000
) -> AccuracyPair:
    """Accuracy on ``x`` and on ``attack``'s adversarial examples for it.

    Only the points classified correctly are attacked: a misclassified point counts as broken.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AdvtrainError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(x) == 0:
        return AccuracyPair(float("nan"), float("nan"), 0)
    correct = predict(model, x, batch_size) == y
    robust = correct.clone()
    index = correct.nonzero().squeeze(1)
    for start in range(0, len(index), batch_size):
        chunk = index[start : start + batch_size]
        x_adv = attack(model, x[chunk], y[chunk])
        robust[chunk] = predict(model, x_adv, batch_size) == y[chunk]
    return AccuracyPair(float(correct.float().mean()), float(robust.float().mean()), len(x))
