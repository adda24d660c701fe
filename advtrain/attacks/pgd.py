"""Projected gradient descent (PGD), for the linf, l2 and l1 threat models.

Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards deep learning models resistant to adversarial
attacks" (ICLR 2018). From a random point of the ball, repeat: step along the steepest-ascent
direction of the loss for the norm, project back into the threat model.

Defaults: 40 steps (Madry et al.'s MNIST attack), a uniform random start, cross-entropy loss,
and a step of ``2.5 * eps / steps``, the rule of Madry's group (their ``robustness`` library)
that lets PGD cross the ball from any start. Madry et al.'s MNIST paper setting is
``step_size=0.01`` at eps = 0.3 (0.01875 by our rule); pass it to reproduce the paper exactly.
We keep the rule because it is the stronger attack (the README compares the two).

In evaluation mode (``early_stop=True``, the default) a point the model already gets wrong is
returned as it is, a point leaves the batch as soon as it is misclassified, and each point
returns its first misclassified iterate, or else its highest-loss iterate after the start. Every
point of a batch draws its random start, as in Madry et al.'s code. In training mode
(``early_stop=False``) every point takes every step and the last iterate is returned, as in
Madry et al.'s adversarial training. Each step is :func:`~advtrain.attacks.ascent.ascent_step`,
the step-and-project shared with training's inner maximisations.

Example:
    >>> attack = PGD(eps=0.3, steps=40, step_size=0.01)
    >>> x_adv = attack(model, x, y)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..losses import attack_objective, check_loss, is_adversarial
from ..threat import ThreatModel
from ..util import check_positive_int
from .ascent import ascent_step, projected_ascent
from .base import Attack, Outcome, compaction_interval
from .gradient import input_gradient
from .registry import register

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .base import AttackOptions


@register("pgd")
class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018).

    Args:
        threat: the threat model (or pass ``norm``/``eps``/bounds as keywords).
        steps: gradient steps per run (default 40).
        step_size: size of each step in the norm (default ``2.5 * eps / steps``).
        random_start: start from a uniform point of the ball (default True).
        loss: ``"ce"`` (cross-entropy) or ``"cw"`` (Carlini-Wagner margin).
        early_stop: evaluation mode (see the module docstring); False for adversarial training.
        restarts, batch_size, seed: see :class:`~advtrain.attacks.base.Attack`.
    """

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        steps: int = 40,
        step_size: float | None = None,
        random_start: bool = True,
        loss: str = "ce",
        early_stop: bool = True,
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(threat, **options)
        check_positive_int("steps", steps)
        if step_size is None:
            step_size = self.default_step_size(steps)
        if not (
            isinstance(step_size, (int, float)) and step_size >= 0 and step_size < float("inf")
        ):
            raise AdvtrainError(f"step_size must be finite and >= 0, got {step_size!r}")
        self.steps = steps
        self.step_size = float(step_size)
        self.random_start = random_start
        self.loss = check_loss(loss)
        self.early_stop = early_stop

    def default_step_size(self, steps: int) -> float:
        return 2.5 * self.threat.eps / steps

    def _hyperparameters(self) -> dict[str, object]:
        return {
            **super()._hyperparameters(),
            "steps": self.steps,
            "step_size": self.step_size,
            "random_start": self.random_start,
            "loss": self.loss,
            "early_stop": self.early_stop,
        }

    @property
    def screens_clean_points(self) -> bool:
        return False  # :meth:`run` does, after drawing every point's start (as Madry et al.)

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        threat = self.threat
        x_adv = threat.random_start(x, generator) if self.random_start else x.clone()
        if not self.early_stop and self.restarts == 1:
            return self._last_iterate(model, x, y, target, x_adv)
        best = Outcome(
            x_adv.clone(),
            torch.zeros(len(x), dtype=torch.bool, device=x.device),
            torch.full((len(x),), float("-inf"), device=x.device),
        )
        active = torch.arange(len(x), device=x.device)  # rows of `best` still being attacked
        x_clean, labels, targets = x, y, target
        if self.early_stop and self.random_start:  # (without one, the first iterate is x)
            with torch.no_grad():
                done = is_adversarial(model(x), y, target)
            if bool(done.any()):  # already adversarial: returned as it is, not attacked
                best.merge(Outcome(x, done, torch.full_like(best.loss, float("inf"))), active)
                keep = ~done
                active, x_adv, x_clean, labels = active[keep], x_adv[keep], x[keep], y[keep]
                targets = None if target is None else target[keep]
                if len(active) == 0:
                    return best
        every = compaction_interval(x.device)
        for step in range(self.steps + 1):
            last = step == self.steps
            x_adv = x_adv.detach().requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                logits = model(x_adv)
                objective = attack_objective(logits, labels, targets, self.loss)
            success = is_adversarial(logits.detach(), labels, targets)
            if self.early_stop or last:
                score = objective.detach()
                if step == 0:  # the start counts only if it is already adversarial
                    score = score.masked_fill(~success, float("-inf"))
                best.merge(Outcome(x_adv.detach(), success, score), active)
            if last:
                break
            grad = input_gradient(objective.sum(), x_adv)
            if self.early_stop and (step + 1) % every == 0 and bool(success.any()):
                keep = ~success
                active, x_adv, grad = active[keep], x_adv[keep], grad[keep]
                x_clean, labels = x_clean[keep], labels[keep]
                targets = None if targets is None else targets[keep]
                if len(active) == 0:
                    break
            x_adv = ascent_step(threat, x_adv, grad, x_clean, self.step_size)
        return best

    def _last_iterate(
        self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, x_adv: Tensor
    ) -> Outcome:
        """Training mode with one run: every step on every point, no bookkeeping, last iterate."""

        def objective(points: Tensor) -> Tensor:
            return attack_objective(model(points), y, target, self.loss)

        x_adv = projected_ascent(objective, x, x_adv, self.threat, self.steps, self.step_size)
        zeros = torch.zeros(len(x), device=x.device)
        return Outcome(x_adv, zeros.bool(), zeros)
