"""DeepFool: the minimum-norm attack that steps to the nearest linearised decision boundary.

Moosavi-Dezfooli, Fawzi & Frossard, "DeepFool: a simple and accurate method to fool deep neural
networks" (CVPR 2016), Algorithm 2 (multi-class) with its l_p generalisation (section 3.3). At the
current point ``x_i`` the classifier is linearised: for each candidate class ``k`` the boundary
with the true class ``y`` is the hyperplane ``f_k - f_y + w_k . (z - x_i) = 0`` with
``w_k = grad(f_k - f_y)``. The point steps onto the nearest one, at distance
``|f_k - f_y| / ||w_k||_q`` (q the dual norm of p):

- l2: ``r = |f| / ||w||_2 * w / ||w||_2``;
- linf: ``r = |f| / ||w||_1 * sign(w)``.

The steps are accumulated into ``r_tot`` and the point is ``x + (1 + overshoot) * r_tot``, as in
the authors' code; a point stops as soon as it is misclassified. Defaults are the paper's and
Foolbox's: 50 steps, ``overshoot = 0.02``, and the 10 classes most likely at the clean point
(``candidates``, the true class included; clamped to the number of classes). Like the authors'
code and Foolbox, each step is lengthened by ``1e-4`` so that a point that lands exactly on a
boundary still crosses it.

Each point is kept inside the bounds (clipped) and the mask is respected: the gradients are zero
on immutable features, so the step never moves them. With ``target`` only the boundary between
the target and the strongest other class is used, until the target is predicted.

Example:
    >>> result = DeepFool(norm="l2").min_norm(model, x, y)   # result.norm: per-point l2 margin
    >>> x_adv = DeepFool(norm="linf", eps=0.1)(model, x, y)  # kept within eps = 0.1
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..losses import is_adversarial, other_classes
from ..threat import ThreatModel, lp_norm
from ..util import check_positive_int
from .base import MinNormAttack
from .gradient import input_gradient
from .registry import register

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .base import AttackOptions

#: Added to every DeepFool step (in the norm of the attack), as in the authors' code.
STEP_SLACK = 1e-4


def boundary_gradients(
    model: nn.Module, x: Tensor, towards: Tensor, away: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The logit differences ``f_k - f_away`` at ``x`` for the classes ``towards`` and their
    input gradients (the Jacobian rows needed, one batched backward pass).

    Args:
        towards: (n, K) classes per point.
        away: (n,) the class to beat; ``None``: the strongest class not in ``towards``.

    Returns:
        the logits (n, C), the differences (n, K) and their gradients (n, K, *x.shape[1:]).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        if away is None:
            away = logits.detach().scatter(1, towards, float("-inf")).argmax(dim=1)
        diff = logits.gather(1, towards) - logits.gather(1, away[:, None])
        columns = diff.shape[1]
        if columns > 1:
            # All K backward passes at once (vmap); models whose operators vmap cannot batch
            # fall back to one backward pass per column.
            picks = torch.eye(columns, dtype=diff.dtype, device=diff.device)[:, None].expand(
                columns, *diff.shape
            )
            try:
                grads = input_gradient(diff, x, picks, retain_graph=True, batched=True)
                return logits.detach(), diff.detach(), grads.transpose(0, 1)
            except (RuntimeError, NotImplementedError):
                pass
        one_by_one = [
            input_gradient(diff[:, k].sum(), x, retain_graph=k < columns - 1)
            for k in range(columns)
        ]
    return logits.detach(), diff.detach(), torch.stack(one_by_one, dim=1)


def dual_norm(grads: Tensor, norm: str) -> Tensor:
    """The dual norm of each gradient over the input dimensions: (n, K, ...) -> (n, K)."""
    flat = grads.flatten(start_dim=2)
    if norm == "linf":
        return flat.abs().sum(dim=2)
    if norm == "l2":
        return flat.norm(p=2, dim=2)
    return flat.abs().amax(dim=2)  # l1


@register("deepfool")
class DeepFool(MinNormAttack):
    """DeepFool (Moosavi-Dezfooli et al. 2016), l2 or linf.

    Args:
        threat: the threat model, or ``norm`` (``"l2"``/``"linf"``), bounds and mask as keywords;
            ``eps`` may be omitted (unbounded: :meth:`min_norm` gives each point's margin).
        steps: linearisation steps per point (default 50).
        overshoot: the accumulated step is scaled by ``1 + overshoot`` (default 0.02).
        candidates: how many of the most likely classes (the true class included) to consider
            (default 10; clamped to the number of classes).
        restarts, batch_size, seed: see :class:`~advtrain.attacks.base.Attack` (DeepFool is
            deterministic, so restarts only repeat it).
    """

    norms = ("l2", "linf")

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        steps: int = 50,
        overshoot: float = 0.02,
        candidates: int = 10,
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(threat, **options)
        check_positive_int("steps", steps)
        check_positive_int("candidates", candidates)
        if candidates < 2:
            raise AdvtrainError(
                f"candidates must be at least 2 (the true class and one other), got {candidates}"
            )
        if not (isinstance(overshoot, (int, float)) and 0 <= overshoot < math.inf):
            raise AdvtrainError(f"overshoot must be finite and >= 0, got {overshoot!r}")
        self.steps, self.overshoot, self.candidates = steps, float(overshoot), candidates

    def _hyperparameters(self) -> dict[str, object]:
        return {
            **super()._hyperparameters(),
            "steps": self.steps,
            "overshoot": self.overshoot,
            "candidates": self.candidates,
        }

    def minimize(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        threat = self.threat
        x_adv = x.clone()
        if len(x) == 0:
            return x_adv
        with torch.no_grad():
            logits = model(x)
        others = None
        if target is None:
            count = min(self.candidates, logits.shape[1]) - 1
            if count < 1:
                return x_adv  # a single class: nothing to fool
            others = other_classes(logits, y, count)
        total = torch.zeros_like(x)  # the accumulated step r_tot
        index = (~is_adversarial(logits, y, target)).nonzero().squeeze(1)
        for _ in range(self.steps):
            if len(index) == 0:
                break
            if others is not None:
                logits, diff, grads = boundary_gradients(
                    model, x_adv[index], others[index], y[index]
                )
            else:
                assert target is not None  # others is None only for a targeted run
                logits, diff, grads = boundary_gradients(model, x_adv[index], target[index, None])
            keep = ~is_adversarial(logits, y[index], None if target is None else target[index])
            index, diff, grads = index[keep], diff[keep], grads[keep]
            if len(index) == 0:
                break
            total[index] += self._step(diff, threat.apply_mask(grads))
            x_adv[index] = threat.clip_bounds(
                x[index] + threat.apply_mask((1 + self.overshoot) * total[index])
            )
        return x_adv

    def _step(self, diff: Tensor, grads: Tensor) -> Tensor:
        """The step to the nearest linearised boundary: (n, K), (n, K, ...) -> (n, ...)."""
        norms = dual_norm(grads, self.threat.norm)
        distance = diff.abs() / (norms + 1e-8)
        nearest = distance.argmin(dim=1)
        rows = torch.arange(len(diff), device=diff.device)
        distance, grad = distance[rows, nearest] + STEP_SLACK, grads[rows, nearest]
        shape = (-1,) + (1,) * (grad.dim() - 1)
        if self.threat.norm == "linf":
            return distance.reshape(shape) * grad.sign()
        return (distance / (lp_norm(grad, "l2") + 1e-8)).reshape(shape) * grad
