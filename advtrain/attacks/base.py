"""The attack protocol shared by every attack.

An attack is configured once (threat model, hyperparameters) and called as
``attack(model, x, y, *, target=None) -> x_adv``. The base class gives every attack:

- input checks and the threat model's validation, with one-line errors;
- the model put in eval mode with its parameters frozen, and both restored afterwards, so no
  parameter gradient is ever left behind;
- batching, and moving inputs to the model's device and back;
- restarts that keep the worst case *per sample* (a success beats any failure; among failures
  the higher loss wins), run only on the points that are still standing.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..threat import ThreatModel


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with ``requires_grad=False`` parameters; restore both on exit."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def model_device(model: nn.Module, default: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer (``default`` for a stateless model)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return default


@dataclass
class Outcome:
    """What one run of an attack found for a batch: the points, their success and loss."""

    x_adv: Tensor
    success: Tensor  # bool, per sample
    loss: Tensor  # per sample, the objective the attack ascends (higher is worse for the model)

    def merge(self, other: Outcome, index: Tensor) -> None:
        """Keep, per sample, the worse of self[index] and ``other`` (success first, then loss)."""
        have_success, have_loss = self.success[index], self.loss[index]
        better = (other.success & ~have_success) | (
            (other.success == have_success) & (other.loss > have_loss)
        )
        chosen = index[better]
        self.x_adv[chosen] = other.x_adv[better]
        self.success[chosen] = other.success[better]
        self.loss[chosen] = other.loss[better]


class Attack(ABC):
    """Base class of all attacks.

    Args:
        threat: the threat model; when omitted it is built from ``norm``, ``eps``, ``lower``,
            ``upper`` and ``mask``.
        restarts: independent runs; each sample keeps its worst case over them.
        batch_size: attack this many samples at a time (``None``: all at once).
        seed: seeds the attack's own random generator (random starts), for reproducible results.
    """

    #: The registry name of the attack.
    name: ClassVar[str] = ""
    #: The norms the attack supports.
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2", "l1")

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        norm: str = "linf",
        eps: float | None = None,
        lower: float | Tensor = 0.0,
        upper: float | Tensor = 1.0,
        mask: Tensor | None = None,
        restarts: int = 1,
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        if threat is None:
            if eps is None:
                raise AdvtrainError(f"{type(self).__name__} needs a threat model or an eps")
            threat = ThreatModel(norm=norm, eps=eps, lower=lower, upper=upper, mask=mask)  # type: ignore[arg-type]
        elif not isinstance(threat, ThreatModel):
            raise AdvtrainError(f"threat must be a ThreatModel, got {type(threat).__name__}")
        if threat.norm not in self.norms:
            raise AdvtrainError(
                f"{type(self).__name__} supports the norms {', '.join(self.norms)}, not {threat.norm}"
            )
        _check_positive_int("restarts", restarts)
        if batch_size is not None:
            _check_positive_int("batch_size", batch_size)
        self.threat = threat
        self.restarts = restarts
        self.batch_size = batch_size
        self.seed = seed

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._hyperparameters().items())
        return f"{type(self).__name__}({fields})"

    def _hyperparameters(self) -> dict[str, object]:
        return {"norm": self.threat.norm, "eps": self.threat.eps, "restarts": self.restarts}

    # ------------------------------------------------------------------ the protocol
    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, *, target: Tensor | None = None
    ) -> Tensor:
        """Adversarial examples for ``x`` (labels ``y``), inside the threat model.

        With ``target`` (one class per sample) the attack tries to make the model predict it.
        """
        _check_inputs(x, y, target)
        self.threat.validate(x)
        home = x.device
        device = model_device(model, default=home)
        x, y = x.detach().to(device), y.to(device)
        target = None if target is None else target.to(device)
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
        size = self.batch_size or max(len(x), 1)
        with frozen(model):
            pieces = [
                self._restarts(
                    model, x[i : i + size], y[i : i + size],
                    None if target is None else target[i : i + size], generator,
                ).x_adv
                for i in range(0, len(x), size)
            ]
        x_adv = torch.cat(pieces) if pieces else x.clone()
        return x_adv.detach().to(home)

    def _restarts(
        self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        """Run the attack ``restarts`` times, each time only on the samples not yet broken."""
        best: Outcome | None = None
        for _ in range(self.restarts):
            index = (
                torch.arange(len(x), device=x.device) if best is None
                else (~best.success).nonzero().squeeze(1)
            )
            if len(index) == 0:
                break
            outcome = self.run(
                model, x[index], y[index], None if target is None else target[index], generator
            )
            if best is None:
                best = outcome
            else:
                best.merge(outcome, index)
        assert best is not None
        return best

    @abstractmethod
    def run(
        self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        """One run of the attack on one batch (model already frozen, tensors on its device)."""



def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdvtrainError(f"{name} must be a positive integer, got {value!r}")


def _check_inputs(x: Tensor, y: Tensor, target: Tensor | None) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise AdvtrainError("x and y must be tensors")
    if x.dim() < 2:
        raise AdvtrainError(f"x must be a batch (N, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise AdvtrainError(f"x must be a floating-point tensor, got {x.dtype}")
    for name, labels in (("y", y), ("target", target)):
        if labels is None:
            continue
        if labels.shape != (x.shape[0],):
            raise AdvtrainError(
                f"{name} must have shape ({x.shape[0]},) to match x, got {tuple(labels.shape)}"
            )
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise AdvtrainError(f"{name} must hold integer class labels, got {labels.dtype}")
        if len(labels) and int(labels.min()) < 0:
            raise AdvtrainError(f"{name} holds a negative class label")
