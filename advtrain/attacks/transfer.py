"""Transfer attack: craft adversarial examples on a surrogate model, apply them to the target.

Papernot, McDaniel & Goodfellow, "Transferability in machine learning: from phenomena to black-box
attacks using adversarial samples" (2016); Tramèr et al., "The space of transferable adversarial
examples" (2017). The target model is only asked for its predictions (to skip the points it
already gets wrong and to judge success); every gradient comes from the surrogate. The
surrogate is one the user gives, or one trained on the same data with :func:`fit_surrogate`.

The default crafting attack is PGD-40 with cross-entropy on the surrogate, every step taken
(``early_stop=False``): the first point across the surrogate's boundary is too close to it to
cross the target's, so the loss is pushed as far as the budget allows. Any attack of the
library can be passed instead.

Example:
    >>> attack = Transfer(surrogate, eps=0.3)              # PGD-40 on the surrogate
    >>> x_adv = attack(target_model, x, y)
    >>> report = transfer_rate(target_model, attack, x, y)  # how many of them carry over
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..losses import is_adversarial
from ..threat import ThreatModel
from ..util import check_positive_int
from .base import Attack, Outcome, frozen, model_device
from .registry import make_attack, register


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
        **kwargs: object,
    ) -> None:
        super().__init__(threat, **kwargs)  # type: ignore[arg-type]
        if not isinstance(surrogate, nn.Module):
            raise AdvtrainError(f"surrogate must be a torch module, got {type(surrogate).__name__}")
        if isinstance(attack, str):
            options = dict(attack_options or {})
            if attack == "pgd":  # run every step: a point just across the surrogate's boundary
                options.setdefault("early_stop", False)  # rarely crosses the target's
            attack = make_attack(attack, self.threat, seed=self.seed, **options)
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


@dataclass(frozen=True)
class TransferReport:
    """How well adversarial examples crafted on a surrogate carry over to a target model.

    ``transfer_rate`` is the fraction of the points that fool the surrogate that also fool the
    target, among the points both models classify correctly when clean.
    """

    n: int  # points both models classify correctly
    surrogate_success: float  # fraction of them that fool the surrogate
    target_success: float  # fraction of them that fool the target
    transfer_rate: float  # P(fools target | fools surrogate)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def transfer_rate(
    model: nn.Module, attack: Transfer, x: Tensor, y: Tensor, *, batch_size: int = 500
) -> TransferReport:
    """Craft on ``attack.surrogate`` and measure how many examples transfer to ``model``."""
    from ..evaluation import predict

    if not isinstance(attack, Transfer):
        raise AdvtrainError("transfer_rate needs a Transfer attack")
    check_positive_int("batch_size", batch_size)
    both = (predict(model, x, batch_size) == y) & (predict(attack.surrogate, x, batch_size) == y)
    index = both.nonzero().squeeze(1)
    if len(index) == 0:
        nan = float("nan")
        return TransferReport(0, nan, nan, nan)
    x, y = x[index], y[index]
    surrogate_device = model_device(attack.surrogate, default=x.device)
    crafted = attack.crafting(attack.surrogate, x.to(surrogate_device), y.to(surrogate_device))
    crafted = attack.threat.project(crafted.to(x.device), x)
    fools_surrogate = predict(attack.surrogate, crafted, batch_size) != y
    fools_target = predict(model, crafted, batch_size) != y
    carried = (fools_surrogate & fools_target).sum()
    rate = float(carried / fools_surrogate.sum()) if bool(fools_surrogate.any()) else float("nan")
    return TransferReport(
        len(index), float(fools_surrogate.float().mean()), float(fools_target.float().mean()), rate
    )


def fit_surrogate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` as a surrogate on ``(x, y)`` (standard training, Adam); returns it in eval mode.

    For a transfer attack when the target's weights are unknown but its task's data is at hand.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        check_positive_int(name, value)
    device = model_device(model, default=x.device)
    x, y = x.to(device), y.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=generator).split(batch_size):
            index = index.to(device)
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


__all__ = ["Transfer", "TransferReport", "fit_surrogate", "transfer_rate"]
