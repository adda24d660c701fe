"""Auto-PGD (APGD): PGD with momentum and a step size that adapts itself, for linf and l2.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks" (ICML 2020), Algorithm 1. Defaults are the paper's: 100 iterations, first
step ``2 * eps``, momentum ``alpha = 0.75``, checkpoints after 22% of the budget and then at
intervals shrinking by 3% of the budget down to 6%; at a checkpoint a point's step is halved, and
it restarts from its best point, when its loss rose in at most 75% of the steps since the last
checkpoint (``rho = 0.75``), or when neither its step nor its best loss changed since then.
Random start on the sphere of radius eps, as in the authors' code.

In evaluation mode (the default) a point leaves the batch once it is misclassified. Each point
returns its first misclassified iterate, else its highest-loss one. ``loss="ce"`` is APGD-CE,
``loss="dlr"`` APGD-DLR; with ``target`` and ``loss="dlr"`` the targeted DLR loss is used.

Example:
    >>> x_adv = APGD(eps=0.3)(model, x, y)                  # APGD-CE, 100 iterations
    >>> x_adv = APGD(eps=0.3, loss="dlr")(model, x, y)      # APGD-DLR
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..losses import attack_objective, check_loss, is_adversarial
from ..threat import ThreatModel, lp_norm
from ..util import check_positive_int
from .base import Attack, Outcome, compaction_interval, rerun_unbroken
from .give_up import check_factor, hopeless_descent
from .gradient import input_gradient
from .registry import register
from .targeting import check_target_order, ranked_targets

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .base import AttackOptions

#: The paper's defaults (Croce & Hein 2020).
STEPS, RHO, MOMENTUM = 100, 0.75, 0.75
#: With ``settle_below``: the rise of a point's best loss since the previous checkpoint under
#: which it counts as stalled.
SETTLE_TOLERANCE = 1e-3


def checkpoint_schedule(steps: int) -> tuple[int, int, int]:
    """(first interval, interval decrease, smallest interval), in iterations (Croce & Hein 2020)."""
    return max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)


@register("apgd-ce")
class APGD(Attack):
    """Auto-PGD (Croce & Hein 2020) with cross-entropy (default) or DLR loss.

    Args:
        threat: the threat model (linf or l2), or ``norm``/``eps``/bounds as keywords.
        steps: iterations per run (default 100).
        loss: ``"ce"``, ``"dlr"`` or ``"cw"``.
        rho: the fraction of loss increases below which the step is halved (default 0.75).
        momentum: weight of the new step against the last move (default 0.75).
        settle_below: ``None`` (the default, the paper's APGD): every point runs every iteration
            until it succeeds. A loss level: at each checkpoint, a point whose best loss is below
            it and rose by less than :data:`SETTLE_TOLERANCE` since the previous checkpoint
            leaves the run, returned at its best point (for a long run whose only question is
            which points it breaks: with cross-entropy a misclassified point's loss is at least
            ``ln 2``, so a point stalled well below that is not about to break).
        give_up: ``None`` (the default, the paper's APGD), or a factor: at each checkpoint a
            point whose best loss is further below zero than ``give_up`` times its gain since
            the start, carried on at that average rate to the last iteration, leaves the run at
            its best point (:func:`~advtrain.attacks.give_up.hopeless_descent`; after A3, Liu
            et al. 2022). For the losses whose zero is the decision boundary (DLR, CW), not CE.
        restarts, batch_size, seed: see :class:`~advtrain.attacks.base.Attack`.
    """

    norms = ("linf", "l2")

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        steps: int = STEPS,
        loss: str = "ce",
        rho: float = RHO,
        momentum: float = MOMENTUM,
        settle_below: float | None = None,
        give_up: float | None = None,
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(threat, **options)
        check_positive_int("steps", steps)
        for name, value in (("rho", rho), ("momentum", momentum)):
            if not 0 <= value <= 1:
                raise AdvtrainError(f"{name} must be between 0 and 1, got {value!r}")
        if settle_below is not None and not isinstance(settle_below, (int, float)):
            raise AdvtrainError(f"settle_below must be a number or None, got {settle_below!r}")
        self.steps, self.loss, self.rho, self.momentum = steps, check_loss(loss), rho, momentum
        self.settle_below = settle_below
        if give_up is not None:
            check_factor("give_up", give_up)
            if self.loss == "ce":
                raise AdvtrainError("give_up needs a loss whose zero is the boundary (dlr, cw)")
        self.give_up = give_up

    def _hyperparameters(self) -> dict[str, object]:
        return {
            **super()._hyperparameters(),
            "steps": self.steps,
            "loss": self.loss,
            "rho": self.rho,
            "momentum": self.momentum,
            "settle_below": self.settle_below,
            "give_up": self.give_up,
        }

    def _start(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """A random point on the sphere of radius eps (then masked and clamped into bounds)."""
        if self.threat.norm == "linf":
            direction = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            direction = direction * 2 - 1
        else:
            direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        norms = lp_norm(direction, self.threat.norm).clamp_min(1e-12)
        delta = direction / norms.reshape((-1,) + (1,) * (x.dim() - 1)) * self.threat.eps
        return self.threat.project(x + delta, x)

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        return self.descend(model, x, y, target, generator, success_target=target)

    def descend(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
        *,
        success_target: Tensor | None,
    ) -> Outcome:
        """One APGD run ascending the loss towards ``target`` (or away from ``y``); a point
        succeeds when it is classified as ``success_target``, or misclassified when that is None."""
        threat = self.threat
        n = len(x)
        per_sample = (-1,) + (1,) * (x.dim() - 1)

        def evaluate(
            points: Tensor, labels: Tensor, targets: Tensor | None, wanted: Tensor | None
        ) -> tuple[Tensor, Tensor, Tensor]:
            points = points.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(points)
                objective = attack_objective(logits, labels, targets, self.loss)
            grad = input_gradient(objective.sum(), points)
            return objective.detach(), grad, is_adversarial(logits.detach(), labels, wanted)

        x_adv = self._start(x, generator)
        loss, grad, success = evaluate(x_adv, y, target, success_target)
        best = Outcome(x_adv.clone(), success.clone(), loss.masked_fill(~success, float("-inf")))
        state = {
            "index": torch.arange(n, device=x.device),
            "x": x,
            "y": y,
            "x_adv": x_adv,
            "x_prev": x_adv.clone(),
            "grad": grad,
            "x_best": x_adv.clone(),
            "grad_best": grad.clone(),
            "loss_best": loss.clone(),
            "loss_prev": torch.zeros_like(loss),
            "step": torch.full((n,), 2.0 * threat.eps, device=x.device, dtype=x.dtype),
            "rises": torch.zeros(n, device=x.device),
            "loss_at_check": loss.clone(),
            "loss_start": loss.clone(),
            "halved_at_check": torch.ones(n, dtype=torch.bool, device=x.device),
        }
        if target is not None:
            state["target"] = target
        if success_target is not None:
            state["success_target"] = success_target
        state = _keep(state, ~success)
        interval, decrease, smallest = checkpoint_schedule(self.steps)
        since_check, every = 0, compaction_interval(x.device)
        for i in range(self.steps):
            if len(state["index"]) == 0:
                break
            s = state
            a = self.momentum if i > 0 else 1.0
            with torch.no_grad():
                step = s["step"].reshape(per_sample)
                z = threat.project(s["x_adv"] + step * threat.ascent_direction(s["grad"]), s["x"])
                moved = s["x_adv"] + a * (z - s["x_adv"]) + (1 - a) * (s["x_adv"] - s["x_prev"])
                s["x_prev"], s["x_adv"] = s["x_adv"], threat.project(moved, s["x"])
            loss, grad, success = evaluate(
                s["x_adv"], s["y"], s.get("target"), s.get("success_target")
            )
            s["grad"] = grad
            best.merge(Outcome(s["x_adv"], success, loss), s["index"])
            improved = loss > s["loss_best"]
            s["x_best"] = torch.where(improved.reshape(per_sample), s["x_adv"], s["x_best"])
            s["grad_best"] = torch.where(improved.reshape(per_sample), grad, s["grad_best"])
            s["loss_best"] = torch.where(improved, loss, s["loss_best"])
            s["rises"] += (loss > s["loss_prev"]).float()
            s["loss_prev"] = loss
            since_check += 1
            settled = None
            if since_check == interval:
                if self.settle_below is not None:
                    settled = (s["loss_best"] < self.settle_below) & (
                        s["loss_best"] - s["loss_at_check"] < SETTLE_TOLERANCE
                    )
                if self.give_up is not None:
                    hopeless = hopeless_descent(
                        s["loss_best"], s["loss_start"], i + 1, self.steps, self.give_up
                    )
                    settled = hopeless if settled is None else settled | hopeless
                oscillating = s["rises"] <= interval * self.rho
                stalled = ~s["halved_at_check"] & (s["loss_at_check"] >= s["loss_best"])
                halve = oscillating | stalled
                s["step"] = torch.where(halve, s["step"] / 2, s["step"])
                s["x_adv"] = torch.where(halve.reshape(per_sample), s["x_best"], s["x_adv"])
                s["grad"] = torch.where(halve.reshape(per_sample), s["grad_best"], s["grad"])
                s["halved_at_check"], s["loss_at_check"] = halve, s["loss_best"].clone()
                s["rises"] = torch.zeros_like(s["rises"])
                interval, since_check = max(interval - decrease, smallest), 0
            if settled is not None:  # settled (or given-up) points leave at the checkpoint
                state = _keep(s, ~success & ~settled)
            elif (i + 1) % every == 0:  # (every step on the CPU)
                state = _keep(s, ~success)
        return best


def _keep(state: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """The per-sample state of the rows still being attacked (one read-back to the host)."""
    index = rows.nonzero().squeeze(1)
    if len(index) == len(rows):
        return state
    return {key: value[index] for key, value in state.items()}


@register("apgd-dlr")
class APGDDLR(APGD):
    """APGD with the DLR loss (Croce & Hein 2020), robust to rescaled or saturated logits."""

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        steps: int = STEPS,
        loss: str = "dlr",
        rho: float = RHO,
        momentum: float = MOMENTUM,
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(threat, steps=steps, loss=loss, rho=rho, momentum=momentum, **options)


@register("apgd-t")
class APGDT(APGD):
    """Targeted APGD over the top-k classes (Croce & Hein 2020, APGD-T in AutoAttack).

    For each point still standing, the targeted DLR loss is ascended towards its 2nd most likely
    class, then its 3rd, ... up to ``n_targets`` classes (default: every other class, so that
    k follows the number of classes instead of AutoAttack's fixed 9). Any misclassification
    counts as success: APGD-T is an untargeted attack that uses targets to find directions.
    With ``target`` given, it is plain targeted APGD-DLR towards those labels.

    ``target_order``: ``"logits"`` (the default, AutoAttack's) ranks the other classes by logit;
    ``"malt"`` by MALT's linearised distance to their boundary (Melamed et al., NeurIPS 2024;
    :mod:`~advtrain.attacks.targeting`), nearest first.
    """

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        n_targets: int | None = None,
        target_order: str = "logits",
        steps: int = STEPS,
        loss: str = "dlr",
        rho: float = RHO,
        momentum: float = MOMENTUM,
        give_up: float | None = None,
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(
            threat,
            steps=steps,
            loss=loss,
            rho=rho,
            momentum=momentum,
            give_up=give_up,
            **options,
        )
        if n_targets is not None:
            check_positive_int("n_targets", n_targets)
        self.n_targets, self.target_order = n_targets, check_target_order(target_order)

    def _hyperparameters(self) -> dict[str, object]:
        return {
            **super()._hyperparameters(),
            "n_targets": self.n_targets,
            "target_order": self.target_order,
        }

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        if target is not None:
            return super().run(model, x, y, target, generator)
        ranked = ranked_targets(model, x, y, self.n_targets, self.target_order, self.threat.norm)
        return rerun_unbroken(
            len(x),
            x.device,
            ranked.shape[1],
            lambda k, index, _: self.descend(
                model, x[index], y[index], ranked[index, k], generator, success_target=None
            ),
        )
