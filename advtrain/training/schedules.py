"""Schedules: the learning rate per optimizer step, and the eps warm-up per batch.

Learning-rate schedules are pure functions of the optimizer step, giving a multiplier of ``lr``.

Each schedule is ``f(step, total) -> multiplier`` with ``step`` in ``[0, total]`` (a float: the
trainer asks for the middle of each batch's interval, ``i + 0.5`` for the ``i``-th optimizer
step, so that no step of any schedule is taken with a learning rate of exactly zero) and
``total`` the number of optimizer steps of the run. The learning rate of a step is
``lr * f(step, total)``: ``lr`` is the peak (``onecycle``) or starting value (the others).

- ``constant``: 1 throughout.
- ``piecewise``: 1, then 0.1 from half of the steps, then 0.01 from three quarters: the decay of
  Madry et al. (2018) as used for the robust-overfitting study of Rice, Wong & Kolter (2020).
- ``cosine``: ``(1 + cos(pi * step / total)) / 2``, from 1 down to 0 (Loshchilov & Hutter 2017,
  without restarts).
- ``onecycle``: linear from 0 up to 1 at 2/5 of the steps, then linear down to 0 at the end: the
  cyclic schedule of Wong, Rice & Kolter, "Fast is better than free" (ICLR 2020).

:func:`warmup_eps` ramps the attack's radius linearly from 0 over the first epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import unknown

Schedule = Callable[[float, float], float]

#: Where ``onecycle`` peaks, as a fraction of the steps.
ONECYCLE_PEAK = 0.4
#: Where ``piecewise`` decays (fractions of the steps) and by how much each time.
PIECEWISE_MILESTONES = (0.5, 0.75)
PIECEWISE_FACTOR = 0.1


def _fraction(step: float, total: float) -> float:
    if total <= 0:
        return 1.0
    return min(max(step / total, 0.0), 1.0)


def constant(step: float, total: float) -> float:
    """Always 1."""
    del step, total
    return 1.0


def piecewise(step: float, total: float) -> float:
    """1, times 0.1 at each milestone passed (half and three quarters of the steps)."""
    t = _fraction(step, total)
    passed = sum(1 for milestone in PIECEWISE_MILESTONES if t >= milestone)
    return PIECEWISE_FACTOR**passed


def cosine(step: float, total: float) -> float:
    """Half a cosine period from 1 down to 0."""
    return 0.5 * (1.0 + math.cos(math.pi * _fraction(step, total)))


def onecycle(step: float, total: float) -> float:
    """Triangle: 0 -> 1 at 2/5 of the steps -> 0 at the end."""
    t = _fraction(step, total)
    if t <= ONECYCLE_PEAK:
        return t / ONECYCLE_PEAK
    return max(0.0, (1.0 - t) / (1.0 - ONECYCLE_PEAK))


SCHEDULES: dict[str, Schedule] = {
    "constant": constant,
    "piecewise": piecewise,
    "cosine": cosine,
    "onecycle": onecycle,
}


def get_schedule(name: str) -> Schedule:
    """The schedule called ``name``; an unknown name lists the known ones."""
    try:
        return SCHEDULES[name]
    except KeyError:
        raise unknown("schedule", name, list(SCHEDULES)) from None


def lr_multiplier(name: str, step: float, total: float) -> float:
    """``get_schedule(name)(step, total)``."""
    return get_schedule(name)(step, total)


def warmup_eps(
    eps: float, epoch: int, batch: int, batches: int, warmup_epochs: int, replays: int = 1
) -> float:
    """eps for batch ``batch`` (0-based) of epoch ``epoch`` (1-based) of ``batches``: a linear
    ramp from 0 that reaches ``eps`` with the last batch of epoch ``warmup_epochs``.

    Epochs count as ``TrainConfig.epochs`` does: a method with ``replays`` runs each minibatch
    that many times, so one of its passes over the data counts as ``replays`` epochs.
    """
    if warmup_epochs <= 0:
        return eps
    progress = ((epoch - 1) * batches + batch + 1) * replays / (warmup_epochs * batches)
    return eps * min(1.0, progress)
