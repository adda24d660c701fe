"""Counting the forward passes an evaluation spends: :class:`CountedModel`.

RobustBench's model cards and the AutoAttack paper (Croce & Hein 2020) report what an attack
costs in forward passes; :func:`advtrain.evaluate` counts them by wrapping the user's model once,
innermost, so every wrapper built on it (``log(p)``, EOT, the straight-through repair) and every
attack goes through the count. ``points`` counts inputs passed forward (a batch of 100 is 100),
``calls`` the calls. A Square query answered by the window pass
(:mod:`.window_forward`, which runs the inner model's layers on a patch) counts as one forward
pass of each candidate, as the full pass it stands for would.
"""

from __future__ import annotations

from torch import Tensor, nn


class CountedModel(nn.Module):
    """``model`` with a count of its forward calls and of the inputs passed through it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.points = 0
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.add(len(x))
        return self.model(x)

    def counts(self) -> tuple[int, int]:
        """``(points, calls)`` so far."""
        return self.points, self.calls

    def add(self, points: int) -> None:
        """Count one call on ``points`` inputs."""
        self.points += int(points)
        self.calls += 1


def uncounted(model: nn.Module) -> tuple[nn.Module, CountedModel | None]:
    """The model inside a :class:`CountedModel` and the counter (``model`` and None otherwise)."""
    if isinstance(model, CountedModel):
        return model.model, model
    return model, None
