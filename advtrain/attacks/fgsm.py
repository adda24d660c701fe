"""The fast gradient (sign) method: one step of size eps.

Goodfellow, Shlens & Szegedy, "Explaining and harnessing adversarial examples" (ICLR 2015), for
linf (``eps * sign(grad)``); the same single step along the normalised gradient for l2 and l1.
Defaults are the paper's: no random start, step size eps. With ``random_start=True`` and
``step_size=1.25 * eps`` it is the FGSM with random start of Wong, Rice & Kolter, "Fast is better
than free" (ICLR 2020).

Example:
    >>> x_adv = FGSM(eps=0.3)(model, x, y)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..threat import ThreatModel
from .pgd import PGD
from .registry import register

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .base import AttackOptions


@register("fgsm")
class FGSM(PGD):
    """One gradient step of size ``step_size`` (default eps), projected into the threat model.

    ``steps`` is accepted and ignored (one step, whatever is asked), so that the same options can
    be handed to any gradient attack; ``loss`` and ``early_stop`` are :class:`PGD`'s.
    """

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        step_size: float | None = None,
        random_start: bool = False,
        steps: int | None = None,
        loss: str = "ce",
        early_stop: bool = True,
        **options: Unpack[AttackOptions],
    ) -> None:
        del steps
        super().__init__(
            threat,
            steps=1,
            step_size=step_size,
            random_start=random_start,
            loss=loss,
            early_stop=early_stop,
            **options,
        )

    def default_step_size(self, steps: int) -> float:
        return self.threat.eps
