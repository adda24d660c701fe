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

from ..threat import ThreatModel
from .pgd import PGD
from .registry import register


@register("fgsm")
class FGSM(PGD):
    """One gradient step of size ``step_size`` (default eps), projected into the threat model."""

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        step_size: float | None = None,
        random_start: bool = False,
        **kwargs: object,
    ) -> None:
        kwargs.pop("steps", None)
        super().__init__(threat, steps=1, step_size=step_size, random_start=random_start, **kwargs)  # type: ignore[arg-type]

    def default_step_size(self, steps: int) -> float:
        return self.threat.eps
