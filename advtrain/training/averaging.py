"""An exponential moving average of a model's weights, the model a run validates and keeps.

Weight averaging along the training trajectory (Izmailov et al., "Averaging weights leads to
wider optima and better generalization", UAI 2018) is part of strong adversarial training
(Gowal et al., "Uncovering the limits of adversarial training against norm-bounded adversarial
examples", 2020). After optimiser step ``t`` (counted from 1) each floating-point parameter and
buffer of the average moves towards the live model's::

    average <- average + (1 - d_t) * (live - average),   d_t = min(decay, (1 + t) / (10 + t))

The rate's warm-up (the ``num_updates`` rule of TensorFlow's ExponentialMovingAverage) keeps
the first steps' average from holding on to the random initial weights. Integer buffers are
copied.

Written here rather than with :class:`torch.optim.swa_utils.AveragedModel`, which reads its
step count back from the device at every update and so makes a GPU run wait at every step.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class WeightAverage:
    """The exponential moving average of ``model``'s weights with ``decay`` (in (0, 1)).

    ``module`` is the averaged copy (in evaluation mode, without gradients); :meth:`update`
    after each optimiser step; ``state_dict``/``load_state_dict`` carry it across a resume.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0
        self._averaged = list(self.module.state_dict().values())
        self._live = list(model.state_dict().values())

    def rate(self) -> float:
        """The decay used by the next :meth:`update`."""
        t = self.updates + 1
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the live model's current weights."""
        weight = 1.0 - self.rate()
        for averaged, live in zip(self._averaged, self._live):
            if averaged.is_floating_point():
                averaged.lerp_(live, weight)
            else:
                averaged.copy_(live)
        self.updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
