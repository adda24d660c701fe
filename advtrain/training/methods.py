"""Training methods, each a function ``(model, x, y) -> (loss, logits)`` built for a threat model.

The loss is the batch mean to minimise; the logits are those of the inputs the model was trained
on in that step (adversarial ones for adversarial methods), for the running accuracy.

A method is registered by name with :func:`method`; :func:`make_method` builds the loss
function the trainer calls on every batch. The adversarial example inside a loss is crafted
with the model frozen (eval mode, no parameter gradients), as every advtrain attack does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import PGD
from ..errors import AdvtrainError, unknown
from ..threat import ThreatModel

LossFn = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]
MethodFactory = Callable[..., LossFn]
METHODS: dict[str, MethodFactory] = {}


def method(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Register a method factory under ``name``."""

    def decorate(factory: MethodFactory) -> MethodFactory:
        METHODS[name] = factory
        return factory

    return decorate


def make_method(name: str, threat: ThreatModel, **options: Any) -> LossFn:
    """The batch loss of method ``name`` for ``threat``; unknown options are an error.

    Every method takes the options of the attack inside training (``steps``, ``step_size``),
    whether it uses them or not, so that a trainer can pass them to any method.
    """
    try:
        factory = METHODS[name]
    except KeyError:
        raise unknown("method", name, list(METHODS)) from None
    try:
        return factory(threat, **options)
    except TypeError as exc:
        raise AdvtrainError(f"method {name!r}: {exc}") from None


@method("standard")
def standard(threat: ThreatModel, *, steps: int = 10, step_size: float | None = None) -> LossFn:
    """Empirical risk minimisation on clean inputs (the undefended baseline); no attack."""
    del threat, steps, step_size

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    return loss


@method("pgd")
def pgd(threat: ThreatModel, *, steps: int = 10, step_size: float | None = None) -> LossFn:
    """PGD adversarial training (Madry et al., ICLR 2018): cross-entropy on the PGD point.

    Each batch is replaced by the last iterate of ``steps`` PGD steps from a random start,
    step ``2.5 * eps / steps`` unless given.
    """
    if step_size is None:
        step_size = 2.5 * threat.eps / steps
    attack = PGD(threat, steps=steps, step_size=step_size, early_stop=False)

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(attack(model, x, y))
        return F.cross_entropy(logits, y), logits

    return loss
