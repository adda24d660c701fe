"""How well adversarial examples crafted on a surrogate carry over to a target model.

Papernot, McDaniel & Goodfellow, "Transferability in machine learning: from phenomena to black-box
attacks using adversarial samples" (2016); Tramèr et al., "The space of transferable adversarial
examples" (2017). The attack itself is :class:`~advtrain.attacks.Transfer`; a surrogate can be
trained with :func:`advtrain.training.fit_surrogate`.

Example:
    >>> attack = Transfer(surrogate, eps=0.3)              # PGD-40 on the surrogate
    >>> report = transfer_rate(target_model, attack, x, y)  # how many of its examples carry over
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor, nn

from ..attacks.base import model_device
from ..attacks.transfer import Transfer
from ..errors import AdvtrainError
from ..util import check_positive_int
from .basic import predict

__all__ = ["TransferReport", "transfer_rate"]


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
    """Craft on ``attack.surrogate`` with its crafting attack and measure how many of the
    examples transfer to ``model``, on the points both models classify correctly."""
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
