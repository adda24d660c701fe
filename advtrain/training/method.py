"""The training-method protocol: what a trainer needs to know about a method, and nothing else.

A :class:`Method` is built for a threat model and computes, for a batch, the loss to minimise
and the logits of the inputs the model was trained on in that step (adversarial ones for
adversarial methods), for the running accuracy. Beyond the batch loss it tells the trainer:

``replays``
    How many times to train on each minibatch (``zero_grad(); loss.backward(); step()`` after
    each call; 1 for most methods). A trainer runs ``ceil(epochs / replays)`` epochs so that the
    number of gradient steps stays that of ``epochs`` epochs (free adversarial training).
:meth:`~Method.on_epoch_start`
    Called before each epoch; methods with phases (distillation) switch there.
:meth:`~Method.set_eps`
    Follows an eps schedule (warm-up): from the next batch on, the method attacks within the
    new radius, keeping the state it carries.
:meth:`~Method.state_dict` / :meth:`~Method.load_state_dict`
    The tensors a method keeps between batches (the perturbation of free adversarial training,
    the teacher of distillation), so that a resumed run goes on exactly.

The trainer always calls ``loss.backward()`` on the returned loss: a method may read gradients
that fills (free adversarial training reads its perturbation's).

:class:`Mixed` (:func:`mix`) blends any method with clean cross-entropy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..threat import ThreatModel
from ..util import check_finite


class Method(ABC):
    """A training method: a batch loss for a threat model, with what a trainer must honour.

    Subclasses implement :meth:`loss`; the other hooks default to a stateless single-pass
    method.
    """

    #: Calls per minibatch (see the module docstring).
    replays: int = 1

    def __init__(self, threat: ThreatModel) -> None:
        self._threat = threat

    @property
    def threat(self) -> ThreatModel:
        """The threat model the method attacks within now."""
        return self._threat

    @property
    def eps(self) -> float:
        """The radius the method attacks within now."""
        return self.threat.eps

    @abstractmethod
    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss, logits)`` for the batch ``x, y``: the batch mean to minimise, and the logits
        of the inputs the model was trained on in this step."""

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.loss(model, x, y)

    def set_eps(self, eps: float) -> None:
        """Attack within radius ``eps`` from the next batch on (other fields of the threat model
        stay). Options derived from eps by default (step sizes) follow it."""
        if eps != self._threat.eps:
            self._threat = self._threat.replace(eps=eps)

    def on_epoch_start(self, model: nn.Module, epoch: int, epochs: int) -> None:
        """Called before epoch ``epoch`` (from 1) of the ``epochs`` the trainer runs."""
        del model, epoch, epochs

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors the method keeps between batches (none by default)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor], model: nn.Module) -> None:
        """Take back what :meth:`state_dict` returned; ``model`` is the network being trained,
        from which a method rebuilds a module it keeps (a teacher)."""
        del model
        if state:
            raise AdvtrainError(
                f"{type(self).__name__} keeps no state, but was given {', '.join(state)}"
            )


def check_replays(name: str, method: Method) -> int:
    """``method.replays``, checked: an integer >= 1 (a one-line error names the method)."""
    replays = method.replays
    if not isinstance(replays, int) or isinstance(replays, bool) or replays < 1:
        raise AdvtrainError(f"method {name!r}: replays must be an integer >= 1, got {replays!r}")
    return replays


class Mixed(Method):
    """A method blended with clean training: ``r * method_loss + (1 - r) * CE(model(x), y)``.

    ``adv_ratio`` ``r`` lies in [0, 1]: 1 is the method alone (returned as it is computed, with
    no extra clean forward pass), 0 is standard training (the method is not called at all, so
    no attack is run). The returned logits are the method's, or the clean ones at ``r = 0``.
    Everything else (replays, epoch hook, eps, state) is the wrapped method's.
    """

    def __init__(self, method: Method, adv_ratio: float) -> None:
        if not isinstance(method, Method):
            raise AdvtrainError(f"mix needs a training Method, got {type(method).__name__}")
        ratio = check_finite("adv_ratio", adv_ratio)
        if ratio > 1:
            raise AdvtrainError(f"adv_ratio must lie in [0, 1], got {adv_ratio!r}")
        self.method = method
        self.adv_ratio = ratio
        self.replays = method.replays

    @property
    def threat(self) -> ThreatModel:
        return self.method.threat

    def set_eps(self, eps: float) -> None:
        self.method.set_eps(eps)

    def on_epoch_start(self, model: nn.Module, epoch: int, epochs: int) -> None:
        self.method.on_epoch_start(model, epoch, epochs)

    def state_dict(self) -> dict[str, Tensor]:
        return self.method.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor], model: nn.Module) -> None:
        self.method.load_state_dict(state, model)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        ratio = self.adv_ratio
        if ratio == 0:
            logits = model(x)
            return F.cross_entropy(logits, y), logits
        loss, logits = self.method.loss(model, x, y)
        if ratio == 1:
            return loss, logits
        clean = F.cross_entropy(model(x), y)
        return ratio * loss + (1 - ratio) * clean, logits


def mix(method: Method, adv_ratio: float) -> Mixed:
    """``method`` blended with clean cross-entropy at ``adv_ratio`` (see :class:`Mixed`)."""
    return Mixed(method, adv_ratio)
