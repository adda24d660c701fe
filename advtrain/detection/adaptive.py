"""The adaptive attack on a classifier with a detector: fool the one, stay under the other.

Carlini & Wagner, "Adversarial examples are not easily detected: bypassing ten detection methods"
(AISec 2017); Tramèr, Carlini, Brendel & Madry, "On adaptive attacks to adversarial example
defenses" (NeurIPS 2020). A detector is only worth what it flags of the examples an attacker
makes *knowing it is there*: examples of a non-adaptive attack tell nothing about that.

PGD (Madry et al. 2018) on the pair's hinge objective, per point::

    min(margin, kappa) - weight * max((score - threshold) / scale + kappa, 0)

where ``margin`` is Carlini & Wagner's logit margin of the classifier (> 0: misclassified),
``score`` the detector's and ``scale`` the spread of its clean validation scores (so the two
terms are in comparable units, as C&W's constant balances theirs), and ``kappa = 0.1`` a small
confidence on each side. The attack succeeds on a point when the classifier misclassifies it and
the detector does not flag it (score <= threshold); each point keeps its first success, else its
highest objective, and the clean input counts when it already succeeds. :meth:`refine` runs the
same descent from given points: :func:`~.evaluate.evaluate_detector` starts it from the standard
suite's examples too, and keeps per point the better of the two runs. Every iterate is
projected into the threat model, so the outputs stay in it. Defaults: 100 steps, a step of
``2.5 * eps / steps``, a random start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from ..attacks.ascent import ascent_step
from ..attacks.base import Attack, Outcome, frozen, model_device
from ..attacks.gradient import input_gradient
from ..errors import AdvtrainError
from ..losses import cw_margin
from ..threat import ThreatModel
from ..util import check_positive_int
from .base import Detector

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..attacks.base import AttackOptions

#: The hinge's confidence, in logits for the margin and in clean-score spreads for the detector.
KAPPA = 0.1


class DetectorAwarePGD(Attack):
    """PGD against a classifier and its detector together (see the module docstring).

    Args:
        threat: the threat model.
        detector: the detector watching the classifier passed when called.
        threshold: the score to stay at or under (default: the detector's own threshold).
        steps: gradient steps (default 100); step_size: default ``2.5 * eps / steps``.
        weight: the detector term's weight against the classifier's (default 1).
        random_start: start from a uniform point of the ball (default True).
        restarts, batch_size, seed, progress: see :class:`~advtrain.attacks.base.Attack`.
    """

    name: ClassVar[str] = "detector-aware-pgd"

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        detector: Detector | None = None,
        threshold: float | None = None,
        steps: int = 100,
        step_size: float | None = None,
        weight: float = 1.0,
        random_start: bool = True,
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(threat, **options)
        if not isinstance(detector, Detector):
            raise AdvtrainError("DetectorAwarePGD needs the detector it attacks (detector=...)")
        check_positive_int("steps", steps)
        self.detector = detector
        self.threshold = float(detector.threshold if threshold is None else threshold)
        self.steps = steps
        self.step_size = float(2.5 * self.threat.eps / steps if step_size is None else step_size)
        self.weight = float(weight)
        self.random_start = random_start

    def _hyperparameters(self) -> dict[str, object]:
        return {
            **super()._hyperparameters(),
            "detector": self.detector.kind,
            "threshold": self.threshold,
            "steps": self.steps,
            "step_size": self.step_size,
            "weight": self.weight,
        }

    @property
    def screens_clean_points(self) -> bool:
        return False  # a misclassified point the detector flags is still worth attacking

    def outcome(
        self, model: nn.Module, x: Tensor, y: Tensor, *, target: Tensor | None = None
    ) -> Outcome:
        if target is not None:
            raise AdvtrainError("DetectorAwarePGD is untargeted")
        if model is not self.detector.classifier:
            raise AdvtrainError("DetectorAwarePGD attacks the classifier its detector watches")
        with frozen(self.detector):
            return super().outcome(model, x, y)

    def _objective(self, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per point: the hinge objective and whether the point fools the pair."""
        logits, score = self.detector.logits_and_score(x_adv)
        margin = cw_margin(logits, y)
        over = (score - self.threshold) / self.detector.scale
        objective = margin.clamp(max=KAPPA) - self.weight * (over + KAPPA).clamp(min=0)
        success = (margin.detach() > 0) & (score.detach() <= self.threshold)
        return objective, success

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        start = self.threat.random_start(x, generator) if self.random_start else x.clone()
        return self._descend(x, y, start)

    def refine(self, model: nn.Module, x: Tensor, y: Tensor, start: Tensor) -> Outcome:
        """The attack from given starting points (e.g. another attack's examples, already
        misclassified: the descent then mostly lowers the detector's score), projected into the
        threat model first; one run, on ``x``'s device."""
        if model is not self.detector.classifier:
            raise AdvtrainError("DetectorAwarePGD attacks the classifier its detector watches")
        if start.shape != x.shape:
            raise AdvtrainError(f"start has shape {tuple(start.shape)}, inputs {tuple(x.shape)}")
        self.threat.validate(x)
        device = model_device(model, default=x.device)
        size = self.batch_size or max(len(x), 1)
        pieces = []
        with frozen(model), frozen(self.detector):
            for i in range(0, len(x), size):
                xb = x[i : i + size].detach().to(device)
                begin = self.threat.project(start[i : i + size].detach().to(device), xb)
                pieces.append(self._descend(xb, y[i : i + size].to(device), begin))
        if not pieces:
            return Outcome(x.clone(), torch.zeros(0, dtype=torch.bool), torch.zeros(0))
        return Outcome(
            *(
                torch.cat([getattr(p, f) for p in pieces]).to(x.device)
                for f in ("x_adv", "success", "loss")
            )
        )

    def _descend(self, x: Tensor, y: Tensor, start: Tensor) -> Outcome:
        """The steps from ``start``; each point keeps its first success (and leaves the batch
        there), else its best objective; the clean input counts when it already fools the pair."""
        with torch.no_grad():
            objective, success = self._objective(x, y)
        best = Outcome(x.clone(), success, objective.masked_fill(~success, float("-inf")).detach())
        active = (~success).nonzero().squeeze(1)
        x_adv = start[active]
        for step in range(self.steps + 1):
            if len(active) == 0:
                break
            last = step == self.steps
            x_adv = x_adv.detach().requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                objective, success = self._objective(x_adv, y[active])
            best.merge(Outcome(x_adv.detach(), success, objective.detach()), active)
            if last:
                break
            grad = input_gradient(objective.sum(), x_adv)
            x_next = ascent_step(self.threat, x_adv, grad, x[active], self.step_size)
            keep = ~success
            active, x_adv = active[keep], x_next[keep]
        return best
