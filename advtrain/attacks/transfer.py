"""Transfer attack: craft adversarial examples on a surrogate model, apply them to the target.

Papernot, McDaniel & Goodfellow, "Transferability in machine learning: from phenomena to black-box
attacks using adversarial samples" (2016); Tramèr et al., "The space of transferable adversarial
examples" (2017). The target model is only asked for its predictions (to skip the points it
already gets wrong and to judge success); every gradient comes from the surrogate. The
surrogate is one the user gives, or one trained on the same data with
:func:`advtrain.training.fit_surrogate`; :func:`advtrain.evaluation.transfer_rate` measures how
many of the examples carry over.

The default crafting attack is PGD-40 with cross-entropy on the surrogate, every step taken
(``early_stop=False``): the first point across the surrogate's boundary is too close to it to
cross the target's, so the loss is pushed as far as the budget allows. Any attack of the
library can be passed instead.

Example:
    >>> attack = Transfer(surrogate, eps=0.3)              # PGD-40 on the surrogate
    >>> x_adv = attack(target_model, x, y)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..losses import is_adversarial
from ..threat import ThreatModel
from .base import Attack, Outcome, frozen, model_device
from .registry import make_attack, register

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .base import AttackOptions


@register("transfer")
class Transfer(Attack):
    """Adversarial examples crafted on ``surrogate`` with ``attack`` and judged on the target.

    Args:
        surrogate: the model whose gradients are used (a module returning logits).
        threat: the threat model (or ``norm``/``eps``/bounds as keywords).
        attack: the crafting attack, an :class:`Attack` or a registry name (default ``"pgd"``);
            a name is built with this threat model and ``attack_options``.
        attack_options: keyword arguments for a crafting attack given by name.
        restarts, batch_size, seed: see :class:`~advtrain.attacks.base.Attack`; restarts re-run
            the crafting attack with new random starts on the points that did not transfer.
    """

    def __init__(
        self,
        surrogate: nn.Module,
        threat: ThreatModel | None = None,
        *,
        attack: Attack | str = "pgd",
        attack_options: dict[str, object] | None = None,
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(threat, **options)
        if not isinstance(surrogate, nn.Module):
            raise AdvtrainError(f"surrogate must be a torch module, got {type(surrogate).__name__}")
        if isinstance(attack, str):
            crafting = dict(attack_options or {})
            if attack == "pgd":  # run every step: a point just across the surrogate's boundary
                crafting.setdefault("early_stop", False)  # rarely crosses the target's
            attack = make_attack(attack, self.threat, seed=self.seed, **crafting)
        elif attack_options:
            raise AdvtrainError("attack_options apply only to a crafting attack given by name")
        if not isinstance(attack, Attack):
            raise AdvtrainError(f"attack must be an Attack or a name, got {type(attack).__name__}")
        if isinstance(attack, Transfer):
            raise AdvtrainError(
                "the crafting attack of a transfer attack cannot be another transfer"
            )
        self.surrogate = surrogate
        self.crafting = attack

    def _hyperparameters(self) -> dict[str, object]:
        return {**super()._hyperparameters(), "attack": self.crafting}

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        with torch.no_grad():
            already = is_adversarial(model(x), y, target)
        x_adv = x.clone()
        standing = (~already).nonzero().squeeze(1)
        if len(standing):
            crafted = self._craft(
                x[standing], y[standing], None if target is None else target[standing], generator
            )
            x_adv[standing] = self.threat.project(crafted.to(x.device), x[standing])
        with torch.no_grad():
            logits = model(x_adv)
        success = is_adversarial(logits, y, target)
        return Outcome(x_adv, success, _margin(logits, y, target))

    def _craft(
        self, x: Tensor, y: Tensor, target: Tensor | None, generator: torch.Generator | None
    ) -> Tensor:
        """The crafting attack on the surrogate, drawing from our generator when it can."""
        device = model_device(self.surrogate, default=x.device)
        if device != x.device or generator is None:
            return self.crafting(
                self.surrogate,
                x.to(device),
                y.to(device),
                target=None if target is None else target.to(device),
            )
        with frozen(self.surrogate):  # restarts draw new starts from the shared generator
            return self.crafting._restarts(self.surrogate, x, y, target, generator).x_adv


def _margin(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    """How close to success a point is on the target (higher is closer), from its logits."""
    if target is not None:
        return logits.gather(1, target[:, None]).squeeze(1) - logits.amax(dim=1)
    true = logits.gather(1, y[:, None]).squeeze(1)
    return logits.scatter(1, y[:, None], float("-inf")).amax(dim=1) - true


__all__ = ["Transfer"]
