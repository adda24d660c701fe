"""The Carlini-Wagner L2 attack: the smallest L2 perturbation that changes the prediction.

Carlini & Wagner, "Towards evaluating the robustness of neural networks" (IEEE S&P 2017). For
each point, minimise ``||delta||_2^2 + c * f(x + delta)`` over ``w`` with Adam, where the point
is ``x + delta = mid + half * tanh(w)`` (``mid``/``half``: centre and half-width of the box
``[lower, upper]``, per feature), so every iterate lies inside the bounds without clipping, and

- untargeted: ``f = max(Z_y - max_{i != y} Z_i, -kappa)``;
- targeted:   ``f = max(max_{i != t} Z_i - Z_t, -kappa)`` (``Z``: logits, ``kappa``: confidence).

A binary search tunes ``c`` per point: start at ``initial_const``; after each search step, a point
that was broken (at confidence ``kappa``) lowers its upper bound on ``c`` to the current ``c``,
any other point raises its lower bound; ``c`` then moves to the midpoint of its bounds, or is
multiplied by 10 while no success is known. Adam restarts from ``delta = 0`` at every search
step; each point keeps the smallest-L2 adversarial iterate seen over all iterations and steps.

Defaults are those of the authors' code (``l2_attack.py``): 9 search steps, at most 10,000 Adam
iterations per step (learning rate 0.01), ``initial_const = 1e-3``, confidence 0, and the early
abort: every ``steps // 10`` iterations a point stops when its loss did not fall below 0.9999
times its value at the previous check. Unlike the authors' code, which stops the whole batch on
its summed loss, each point stops on its own loss (the inactive ones are no longer computed),
so a point's result does not depend on the batch it is attacked in. As in their code, with 10
or more search steps the last one uses each point's upper bound on ``c``.

Details: the clean point is written as ``atanh`` of its scaled position times ``1 - 1e-6``, so
points on the bounds stay finite; the perturbation is ``half * (tanh(w0 + w) - tanh(w0))``, which
is exactly zero at the start; immutable features (the threat model's ``mask``) and features with
``lower == upper`` get no perturbation at all. Points already misclassified (or at their target)
are returned unchanged.

Example:
    >>> result = CarliniWagnerL2().min_norm(model, x, y)        # result.norm: per-point L2
    >>> x_adv = CarliniWagnerL2(eps=1.0, steps=1000)(model, x, y)  # inside the L2 ball of 1.0
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..losses import cw_margin, is_adversarial
from ..threat import Norm, ThreatModel
from ..util import check_positive_int
from .base import MinNormAttack, Outcome, already_adversarial, put_rows
from .registry import register

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .base import AttackOptions

#: Shrinks the scaled clean point before ``atanh`` so points on the bounds stay finite.
TANH_SHRINK = 1e-6
#: ``c`` at or above this means "no success known yet" (the authors' 1e10 upper bound).
NO_UPPER_BOUND = 1e10
#: Relative decrease of the loss a point needs between two checks to keep going.
ABORT_TOLERANCE = 1e-4
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def adversarial_margin(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    """How far past the decision boundary each point is (>= 0: adversarial at confidence 0).

    Untargeted: ``max_{i != y} Z_i - Z_y``; targeted: ``Z_t - max_{i != t} Z_i``.
    """
    return cw_margin(logits, y) if target is None else -cw_margin(logits, target)


def next_const(
    const: Tensor, lower: Tensor, upper: Tensor, success: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the per-point search over ``c``: (new c, new lower bound, new upper bound)."""
    upper = torch.where(success, torch.minimum(upper, const), upper)
    lower = torch.where(success, lower, torch.maximum(lower, const))
    const = torch.where(upper < NO_UPPER_BOUND * 0.1, (lower + upper) / 2, const * 10)
    return const, lower, upper


@register("cw-l2")
class CarliniWagnerL2(MinNormAttack):
    """Carlini-Wagner L2 (Carlini & Wagner 2017), a minimum-norm attack.

    Args:
        threat: an l2 threat model, or ``eps`` (default unbounded) and bounds/mask as keywords.
        binary_search_steps: search steps over the constant ``c`` (default 9).
        steps: most Adam iterations per search step (default 10,000; early abort on).
        lr: Adam's learning rate (default 0.01).
        initial_const: the first ``c`` of every point (default 1e-3).
        confidence: the margin ``kappa`` a point must pass the boundary by (default 0).
        abort_early: stop a point's search step when its loss stalls (default True).
        restarts, batch_size, seed, progress: see :class:`~advtrain.attacks.base.Attack`; the
            attack is deterministic, so restarts only repeat it.
    """

    norms: ClassVar[tuple[str, ...]] = ("l2",)
    default_norm: ClassVar[Norm] = "l2"

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        binary_search_steps: int = 9,
        steps: int = 10000,
        lr: float = 0.01,
        initial_const: float = 1e-3,
        confidence: float = 0.0,
        abort_early: bool = True,
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(threat, **options)
        check_positive_int("binary_search_steps", binary_search_steps)
        check_positive_int("steps", steps)
        for name, value, least in (
            ("lr", lr, "> 0"),
            ("initial_const", initial_const, "> 0"),
            ("confidence", confidence, ">= 0"),
        ):
            ok = (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
            if not ok or value < 0 or (least == "> 0" and value == 0):
                raise AdvtrainError(f"{name} must be a finite number {least}, got {value!r}")
        self.binary_search_steps = binary_search_steps
        self.steps = steps
        self.lr = float(lr)
        self.initial_const = float(initial_const)
        self.confidence = float(confidence)
        self.abort_early = bool(abort_early)

    def _hyperparameters(self) -> dict[str, object]:
        return {
            **super()._hyperparameters(),
            "binary_search_steps": self.binary_search_steps,
            "steps": self.steps,
            "lr": self.lr,
            "initial_const": self.initial_const,
            "confidence": self.confidence,
            "abort_early": self.abort_early,
        }

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        if self.threat.eps == 0:  # nothing may change: no need to search
            return self._judged(model, x, y, target, x)
        return super().run(model, x, y, target, generator)

    def minimize(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        """The smallest-L2 adversarial point found for each point (the point itself if none)."""
        x_best = x.clone()
        if len(x) == 0:
            return x_best
        todo = (~already_adversarial(model, x, y, target)).nonzero().squeeze(1)
        if len(todo):
            x_best[todo] = self._search(
                model, x[todo], y[todo], None if target is None else target[todo]
            )
        return x_best

    # ------------------------------------------------------------------ the search
    def _tanh_space(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(``w0``, ``scale``): ``x`` in tanh space, and the perturbation per unit of tanh."""
        lower = torch.as_tensor(self.threat.lower, dtype=x.dtype, device=x.device)
        upper = torch.as_tensor(self.threat.upper, dtype=x.dtype, device=x.device)
        half = ((upper - lower) / 2).expand_as(x)
        mid = ((upper + lower) / 2).expand_as(x)
        fixed = half <= 0
        ratio = ((x - mid) / torch.where(fixed, torch.ones_like(half), half)).clamp(-1, 1)
        w0 = torch.atanh(ratio.masked_fill(fixed, 0) * (1 - TANH_SHRINK))
        return w0, self.threat.apply_mask(half.masked_fill(fixed, 0))

    def _search(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        """The binary search over ``c`` for points that are all still correctly classified."""
        n = len(x)
        w0, scale = self._tanh_space(x)
        tanh0 = torch.tanh(w0)
        best_l2 = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
        x_best = x.clone()
        const = torch.full((n,), self.initial_const, dtype=x.dtype, device=x.device)
        lower = torch.zeros_like(const)
        upper = torch.full_like(const, NO_UPPER_BOUND)
        for outer in range(self.binary_search_steps):
            if self.binary_search_steps >= 10 and outer == self.binary_search_steps - 1:
                const = upper.clone()  # the authors' last try: the least c known to succeed
            success = self._descend(model, x, y, target, w0, tanh0, scale, const, best_l2, x_best)
            const, lower, upper = next_const(const, lower, upper, success)
        return x_best

    def _descend(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        w0: Tensor,
        tanh0: Tensor,
        scale: Tensor,
        const: Tensor,
        best_l2: Tensor,
        x_best: Tensor,
    ) -> Tensor:
        """Adam on ``w`` for one value of ``c`` per point, from ``delta = 0``.

        Updates ``best_l2``/``x_best`` in place; returns which points were broken at this ``c``.
        The per-point state is kept compact: a point that stops leaves every tensor at once.
        """
        n = len(x)
        beta1, beta2 = ADAM_BETAS
        success = torch.zeros(n, dtype=torch.bool, device=x.device)
        s = {
            "index": torch.arange(n, device=x.device),
            "x": x,
            "y": y,
            "c": const,
            "w0": w0,
            "tanh0": tanh0,
            "scale": scale,
            "w": torch.zeros_like(x),
            "m1": torch.zeros_like(x),
            "m2": torch.zeros_like(x),
            "prev": torch.full((n,), float("inf"), dtype=x.dtype, device=x.device),
        }
        if target is not None:
            s["target"] = target
        check = max(self.steps // 10, 1)
        for step in range(self.steps):
            w = s["w"].requires_grad_(True)
            with torch.enable_grad():
                delta = s["scale"] * (torch.tanh(s["w0"] + w) - s["tanh0"])
                x_adv = self.threat.clip_bounds(s["x"] + delta)
                logits = model(x_adv)
                l2 = (x_adv - s["x"]).flatten(1).pow(2).sum(dim=1)
                margin = adversarial_margin(logits, s["y"], s.get("target"))
                loss = l2 + s["c"] * (self.confidence - margin).clamp_min(0)
            (grad,) = torch.autograd.grad(loss.sum(), w)
            with torch.no_grad():
                index = s["index"]
                broken = is_adversarial(logits, s["y"], s.get("target")) & (
                    margin >= self.confidence
                )
                success[index] = success[index] | broken
                better = broken & (l2 < best_l2[index])
                put_rows(best_l2, index, better, l2)
                put_rows(x_best, index, better, x_adv)
                t = step + 1
                s["m1"] = beta1 * s["m1"] + (1 - beta1) * grad
                s["m2"] = beta2 * s["m2"] + (1 - beta2) * grad * grad
                step_size = self.lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                s["w"] = w.detach() - step_size * s["m1"] / (s["m2"].sqrt() + ADAM_EPS)
                if self.abort_early and step % check == 0:
                    keep = ~(loss > s["prev"] * (1 - ABORT_TOLERANCE))
                    s["prev"] = loss.detach()
                    if not bool(keep.all()):
                        s = {key: value[keep] for key, value in s.items()}
                        if len(s["index"]) == 0:
                            break
        return success
