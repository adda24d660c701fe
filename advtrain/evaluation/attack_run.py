"""One attack on a set of points, measured: what ``advtrain attack`` reports and saves.

:func:`run_attack` predicts the clean points, attacks them (untargeted, or towards a target
class, in which case the points already of that class are left alone), predicts the adversarial
points and times the whole; :class:`AttackRun` keeps every per-point array and derives the
figures from them.

The figures: clean and adversarial accuracy over all ``n`` points; the success rate over the
attacked points (untargeted: the share misclassified after the attack, including points the
model already got wrong, which attacks leave as they are; targeted: the share the model then
assigns to the target class); and the median perturbation norm (in the threat model's norm) of
the successful adversarial examples. A figure with nothing to measure is NaN.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..attacks import Attack
from ..errors import AdvtrainError
from ..threat import lp_norm
from .basic import predict


@dataclass(frozen=True, eq=False)
class AttackRun:
    """The outcome of :func:`run_attack`, per point, and its summary figures.

    ``x``, ``x_adv``: the clean and adversarial inputs; ``y``: the labels; ``pred_clean``,
    ``pred_adv``: the model's predictions on both; ``attacked``: bool, the points the attack was
    run on (all, unless targeted); ``success``: bool, the points whose attack succeeded;
    ``perturbation_norm``: ``||x_adv - x||`` per point; ``target``: the target class per point
    (None: untargeted); ``seconds``: wall time of the predictions and the attack.
    """

    x: Tensor
    x_adv: Tensor
    y: Tensor
    pred_clean: Tensor
    pred_adv: Tensor
    attacked: Tensor
    success: Tensor
    perturbation_norm: Tensor
    target: Tensor | None
    seconds: float

    @property
    def n(self) -> int:
        """Number of points."""
        return len(self.y)

    @property
    def n_attacked(self) -> int:
        """Number of points attacked (targeted runs leave out those already of the target)."""
        return int(self.attacked.sum())

    @property
    def successes(self) -> int:
        """Number of successful attacks."""
        return int(self.success.sum())

    @property
    def clean_accuracy(self) -> float:
        """Share of points the model classifies correctly (NaN for no points)."""
        return float((self.pred_clean == self.y).float().mean()) if self.n else math.nan

    @property
    def adversarial_accuracy(self) -> float:
        """Share of adversarial points the model classifies correctly (NaN for no points)."""
        return float((self.pred_adv == self.y).float().mean()) if self.n else math.nan

    @property
    def success_rate(self) -> float:
        """Successes over attacked points (NaN when none was attacked)."""
        attacked = self.n_attacked
        return float(self.success.sum()) / attacked if attacked else math.nan

    @property
    def median_perturbation_norm(self) -> float:
        """Median perturbation norm of the successful adversarial examples (NaN: none)."""
        norms = self.perturbation_norm[self.success].numpy()
        return float(np.median(norms)) if len(norms) else math.nan

    def summary(self) -> dict[str, Any]:
        """The figures as a JSON-ready dict (NaN as None, seconds to the millisecond)."""
        return {
            "n": self.n,
            "attacked": self.n_attacked,
            "successes": self.successes,
            "clean_accuracy": _json_float(self.clean_accuracy),
            "adversarial_accuracy": _json_float(self.adversarial_accuracy),
            "success_rate": _json_float(self.success_rate),
            "median_perturbation_norm": _json_float(self.median_perturbation_norm),
            "seconds": round(self.seconds, 3),
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-point arrays as NumPy (``target`` only when targeted), e.g. for ``np.savez``."""
        arrays = {
            "x": self.x.numpy(),
            "x_adv": self.x_adv.numpy(),
            "y": self.y.numpy(),
            "pred_clean": self.pred_clean.numpy(),
            "pred_adv": self.pred_adv.numpy(),
            "success": self.success.numpy().astype(bool),
            "perturbation_norm": self.perturbation_norm.numpy().astype(np.float32),
        }
        if self.target is not None:
            arrays["target"] = self.target.numpy()
        return arrays


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


def run_attack(
    model: nn.Module,
    attack: Attack,
    x: Tensor,
    y: Tensor,
    target: int | Tensor | None = None,
    *,
    batch_size: int = 1000,
    attack_classes: Sequence[int] | None = None,
) -> AttackRun:
    """Attack ``(x, y)`` (on the CPU; the model may sit on any device) and measure the outcome.

    ``target``: None for an untargeted attack; a class index, or one per point, to push each point
    towards (points already labelled with their target are not attacked and count neither as
    success nor as failure). ``attack_classes``: attack only the points whose true label is one
    of these (e.g. the fraud rows); the others are left as they are and count neither as success
    nor as failure. ``batch_size`` batches the predictions; the attack batches itself.
    """
    if target is not None:
        target = torch.full_like(y, target) if isinstance(target, int) else target
        if target.shape != y.shape:
            raise AdvtrainError(
                f"target must be a class index or one per point, got shape {tuple(target.shape)}"
            )
    chosen = torch.ones(len(y), dtype=torch.bool)
    if attack_classes is not None:
        classes = list(attack_classes)
        if not classes or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
            raise AdvtrainError(f"attack_classes must be class indices, got {attack_classes!r}")
        chosen = torch.isin(y, torch.tensor(classes, dtype=y.dtype))
    started = time.perf_counter()
    pred_clean = predict(model, x, batch_size)
    if target is None and attack_classes is None:
        attacked = chosen
        x_adv = attack(model, x, y)
    else:
        # a point already of its target class has nothing to reach
        attacked = chosen if target is None else chosen & (y != target)
        x_adv = x.clone()
        index = attacked.nonzero().squeeze(1)
        if len(index):
            aim = None if target is None else target[index]
            x_adv[index] = attack(model, x[index], y[index], target=aim)
    pred_adv = predict(model, x_adv, batch_size)
    seconds = time.perf_counter() - started
    success = ((pred_adv != y) if target is None else (pred_adv == target)) & attacked
    if len(x):
        norms = lp_norm(x_adv - x, attack.threat.norm)
    else:  # lp_norm cannot flatten an empty batch
        norms = torch.zeros(0, dtype=x.dtype)
    return AttackRun(
        x=x,
        x_adv=x_adv,
        y=y,
        pred_clean=pred_clean,
        pred_adv=pred_adv,
        attacked=attacked,
        success=success,
        perturbation_norm=norms,
        target=target,
        seconds=seconds,
    )
