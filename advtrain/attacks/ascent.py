"""Projected steepest ascent: the one step-and-project loop of PGD and of training's attacks.

From a start, repeat: take the gradient of a per-sample objective at the current point, step
``step_size`` along the threat model's steepest-ascent direction for its norm (``sign(g)`` for
linf, ``g / ||g||_2`` for l2, the sparse step of Croce & Hein 2021 for l1), and project back into
the threat model around the clean input (ball, mask, bounds). The norm-specific parts come from
:class:`~advtrain.threat.ThreatModel`, so one loop serves every norm, as in Madry et al.,
"Towards deep learning models resistant to adversarial attacks" (ICLR 2018).

:func:`ascent_step` is one step; :func:`projected_ascent` runs ``steps`` of them and returns the
last iterate (PGD in training mode, the inner maximisations of TRADES and MART, FGSM with a
random start). PGD's evaluation mode, which keeps each point's best iterate and drops the points
already broken, steps with :func:`ascent_step` inside its own bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..threat import ThreatModel
from .gradient import input_gradient

#: A per-sample objective of the current points (the model is called inside).
Objective = Callable[[Tensor], Tensor]


def ascent_step(
    threat: ThreatModel, x_adv: Tensor, grad: Tensor, x: Tensor, step_size: float
) -> Tensor:
    """``x_adv`` moved ``step_size`` along the steepest-ascent direction of ``grad`` (taken at
    ``x_adv``, so that an l1 step leaves out what the box blocks there), projected into the
    threat model around the clean ``x``."""
    x_adv = x_adv.detach()
    return threat.project(x_adv + step_size * threat.ascent_direction(grad, x_adv), x)


def projected_ascent(
    objective: Objective,
    x: Tensor,
    start: Tensor,
    threat: ThreatModel,
    steps: int,
    step_size: float,
) -> Tensor:
    """The last of ``steps`` projected steepest-ascent steps on ``objective`` from ``start``.

    ``objective(x_adv)`` returns one value per sample; their sum is differentiated with respect
    to the points (a graph cut off from them gives a zero gradient, see
    :func:`~advtrain.attacks.gradient.input_gradient`). The start is not projected: the first
    gradient is taken where the caller put it. Returned detached.
    """
    x_adv = start
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            value = objective(x_adv).sum()
        x_adv = ascent_step(threat, x_adv, input_gradient(value, x_adv), x, step_size)
    return x_adv.detach()
