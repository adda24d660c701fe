"""The set of inputs a threat model allows around a batch, as bound propagation sees it.

For ``linf`` the set is a box: the eps-cube intersected with the input box, features outside
the mask fixed at their value. For ``l2`` it is the eps-ball intersected with that box; it lies
inside two sets whose linear bounds are exact and cheap (the ball alone, and the box
``[max(x - eps, lower), min(x + eps, upper)]``, since no coordinate of a perturbation exceeds
its l2 norm), and every bound here takes the better of the two, both being sound. ``l1`` and a
table's feature constraints are refused with a one-line error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import AdvtrainError
from ..threat import ThreatModel

__all__ = ["BOUND_NORMS", "InputSet"]

#: Norms bound propagation handles.
BOUND_NORMS = ("linf", "l2")


@dataclass(frozen=True)
class InputSet:
    """The allowed inputs around a batch ``centre`` (see the module docstring).

    ``lower``/``upper`` enclose the set coordinate-wise (the whole set for ``linf``); ``mask``
    (one sample's shape, 1.0 where a feature may change) is ``None`` when every feature may.
    """

    centre: Tensor
    lower: Tensor
    upper: Tensor
    norm: str
    eps: float
    mask: Tensor | None

    @classmethod
    def build(cls, threat: ThreatModel, x: Tensor) -> InputSet:
        """The set of ``threat`` around ``x``; inputs outside the threat model's bounds, an l1
        ball, constraints or an unbounded eps are one-line errors."""
        check_threat(threat)
        threat.validate(x)
        x = x.detach()
        box_lower = torch.as_tensor(threat.lower, dtype=x.dtype, device=x.device)
        box_upper = torch.as_tensor(threat.upper, dtype=x.dtype, device=x.device)
        lower = torch.maximum(x - threat.eps, box_lower).minimum(x)
        upper = torch.minimum(x + threat.eps, box_upper).maximum(x)
        mask = None
        if threat.mask is not None:
            mask = threat.mask.to(device=x.device, dtype=x.dtype).expand(x.shape[1:])
            lower = torch.where(mask > 0, lower, x)
            upper = torch.where(mask > 0, upper, x)
        return cls(x, lower, upper, threat.norm, threat.eps, mask)

    def concretize_lower(self, a: Tensor, bias: Tensor) -> Tensor:
        """The minimum of ``a . z + bias`` over the set, per row: ``a`` is ``(N or 1, S,
        *sample_shape)``, ``bias`` broadcasts to ``(N, S)``; returns ``(N, S)``."""
        rows = a.flatten(2)
        mid = ((self.upper + self.lower) / 2).flatten(1).unsqueeze(2)
        radius = ((self.upper - self.lower) / 2).flatten(1).unsqueeze(2)
        bound = (rows @ mid - rows.abs() @ radius).squeeze(2)
        if self.norm == "l2":
            centre = self.centre.flatten(1).unsqueeze(2)
            free = rows if self.mask is None else rows * self.mask.flatten()
            ball = (rows @ centre).squeeze(2) - self.eps * free.norm(dim=2)
            bound = torch.maximum(bound, ball)
        return bound + bias

    def sample_mask(self) -> Tensor:
        """The mask as a float tensor of one sample's shape (ones when there is none)."""
        if self.mask is not None:
            return self.mask
        return torch.ones(self.centre.shape[1:], dtype=self.centre.dtype, device=self.centre.device)


def check_threat(threat: ThreatModel) -> None:
    """A one-line error when bound propagation cannot handle ``threat``."""
    if not isinstance(threat, ThreatModel):
        raise AdvtrainError(f"bounds need a ThreatModel, got {type(threat).__name__}")
    if threat.norm not in BOUND_NORMS:
        raise AdvtrainError(
            f"bound propagation supports the {' and '.join(BOUND_NORMS)} norms, not {threat.norm!r}"
        )
    if not math.isfinite(threat.eps):
        raise AdvtrainError("bound propagation needs a finite eps")
    if threat.constraints is not None:
        raise AdvtrainError(
            "bound propagation does not handle a table's feature constraints; certify without "
            "them (the bound then covers a larger set)"
        )
