"""Training methods, each a :class:`~advtrain.training.method.Method` built for a threat model.

A method is registered by name with :func:`method`; :func:`make_method` builds it from its
options (unknown or invalid options are one-line errors). The adversarial example inside a loss
is crafted with the model frozen (eval mode, no parameter gradients), as every advtrain attack
does, by the projected steepest ascent of :mod:`advtrain.attacks.ascent`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import PGD, frozen
from ..attacks.ascent import projected_ascent
from ..errors import AdvtrainError, unknown
from ..threat import ThreatModel
from ..util import check_finite, check_positive_int
from .method import Method, Mixed, check_replays, mix

MethodFactory = Callable[..., Method]
METHODS: dict[str, MethodFactory] = {}
_Factory = TypeVar("_Factory", bound=MethodFactory)

#: Standard deviation of the Gaussian start of the TRADES and MART inner maximisations.
SMALL_START = 0.001

__all__ = [
    "METHODS",
    "Method",
    "Mixed",
    "make_method",
    "mart_loss",
    "method",
    "mix",
    "trades_loss",
]


def method(name: str) -> Callable[[_Factory], _Factory]:
    """Register a method factory (a :class:`Method` subclass, or a function returning one) under
    ``name``; it is called as ``factory(threat, **options)``."""

    def decorate(factory: _Factory) -> _Factory:
        METHODS[name] = factory
        return factory

    return decorate


def make_method(name: str, threat: ThreatModel, **options: Any) -> Method:
    """The method ``name`` for ``threat``; unknown options are an error.

    Every method takes the options of the attack inside training (``steps``, ``step_size``),
    whether it uses them or not, so that a trainer can pass them to any method.
    """
    try:
        factory = METHODS[name]
    except KeyError:
        raise unknown("method", name, list(METHODS)) from None
    try:
        built = factory(threat, **options)
    except TypeError as exc:
        raise AdvtrainError(f"method {name!r}: {exc}") from None
    if not isinstance(built, Method):
        raise AdvtrainError(
            f"method {name!r}: its factory returned a {type(built).__name__}, not a Method"
        )
    check_replays(name, built)
    return built


# ---------------------------------------------------------------------- option checks


def _step_size(step_size: object) -> float | None:
    return None if step_size is None else check_finite("step_size", step_size)


# ---------------------------------------------------------------------- the pure losses


def trades_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """The TRADES objective (Zhang et al., ICML 2019, eq. 5), averaged over the batch.

    ``CE(f(x), y) + beta * KL(p(x) || p(x'))`` where ``p`` is the softmax; the KL is summed over
    classes and averaged over samples (PyTorch's ``batchmean``), as in the authors' code.
    Gradients flow through both the clean and the adversarial logits.
    """
    log_p_clean = F.log_softmax(logits_clean, dim=1)
    log_p_adv = F.log_softmax(logits_adv, dim=1)
    kl = (log_p_clean.exp() * (log_p_clean - log_p_adv)).sum(dim=1)
    return F.cross_entropy(logits_clean, y) + beta * kl.mean()


def mart_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """The MART objective (Wang et al., ICLR 2020, eq. 8), averaged over the batch.

    Per sample: ``BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x))`` with the boosted
    cross-entropy ``BCE(p(x'), y) = -log p_y(x') - log(1 - max_{k != y} p_k(x'))``.
    Computed in log space (``log(1 - p_k) = logsumexp_{j != k} z_j - logsumexp_j z_j``), so it
    needs none of the small constants the authors' code adds; gradients flow through every term,
    the weight ``1 - p_y(x)`` included.
    """
    n_classes = logits_adv.shape[1]
    if n_classes < 2:
        raise AdvtrainError("MART needs at least two classes")
    log_p_adv = F.log_softmax(logits_adv, dim=1)
    log_p_clean = F.log_softmax(logits_clean, dim=1)
    true = y[:, None]
    # the most probable wrong class under the attack
    other = logits_adv.detach().scatter(1, true, float("-inf")).argmax(dim=1, keepdim=True)
    without_other = logits_adv.scatter(1, other, float("-inf"))
    log_one_minus_other = torch.logsumexp(without_other, dim=1) - torch.logsumexp(logits_adv, dim=1)
    boosted_ce = -log_p_adv.gather(1, true).squeeze(1) - log_one_minus_other
    kl = (log_p_clean.exp() * (log_p_clean - log_p_adv)).sum(dim=1)
    weight = 1 - log_p_clean.gather(1, true).squeeze(1).exp()
    return (boosted_ce + beta * kl * weight).mean()


# ---------------------------------------------------------------------- methods


@method("standard")
class Standard(Method):
    """Empirical risk minimisation on clean inputs (the undefended baseline); no attack."""

    def __init__(
        self, threat: ThreatModel, *, steps: int = 10, step_size: float | None = None
    ) -> None:
        super().__init__(threat)
        del steps, step_size

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y), logits


@method("pgd")
class PGDTraining(Method):
    """PGD adversarial training (Madry et al., ICLR 2018): cross-entropy on the PGD point.

    Each batch is replaced by the last iterate of ``steps`` PGD steps from a random start,
    step ``2.5 * eps / steps`` unless given.
    """

    def __init__(
        self, threat: ThreatModel, *, steps: int = 10, step_size: float | None = None
    ) -> None:
        super().__init__(threat)
        self.steps = check_positive_int("steps", steps)
        self.step_size = step_size
        self._attack = self._build_attack()

    def _build_attack(self) -> PGD:
        size = 2.5 * self.threat.eps / self.steps if self.step_size is None else self.step_size
        return PGD(self.threat, steps=self.steps, step_size=size, early_stop=False)

    def set_eps(self, eps: float) -> None:
        super().set_eps(eps)
        self._attack = self._build_attack()

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(self._attack(model, x, y))
        return F.cross_entropy(logits, y), logits


@method("fgsm-rs")
class FGSMRandomStart(Method):
    """FGSM adversarial training with a random start: Wong, Rice & Kolter, "Fast is better than
    free: revisiting adversarial training" (ICLR 2020).

    Each batch is replaced by one FGSM step from a uniform random point of the eps-ball,
    projected back into the threat model (ball, then bounds), and trained on with cross-entropy.
    As in the authors' code, the gradient is taken at ``x + delta`` *before* the start is clamped
    into the input bounds: on MNIST, clamping it first (most pixels sit at 0 or 1) leaves a
    one-sided start, and training then overfits catastrophically from the first epochs. The step
    is ``1.25 * eps`` unless given: the authors' MNIST setting (``alpha = 0.375`` at
    ``eps = 0.3``) and their CIFAR-10 one (10/255 at 8/255). ``steps`` is accepted and ignored.
    """

    def __init__(
        self, threat: ThreatModel, *, steps: int = 10, step_size: float | None = None
    ) -> None:
        super().__init__(threat)
        check_positive_int("steps", steps)
        self.step_size = _step_size(step_size)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        threat = self.threat
        size = 1.25 * threat.eps if self.step_size is None else self.step_size
        with frozen(model):
            x_adv = projected_ascent(
                lambda points: F.cross_entropy(model(points), y, reduction="none"),
                x,
                x + threat.random_delta(x),
                threat,
                1,
                size,
            )
        logits = model(x_adv)
        return F.cross_entropy(logits, y), logits


@method("free")
class Free(Method):
    """Free adversarial training: Shafahi et al., "Adversarial training for free!" (NeurIPS 2019).

    Each minibatch is replayed ``replays`` times (``m``, default 8, the value of the paper's
    CIFAR-10 results). One backward pass gives both the parameter gradient and the gradient of
    a perturbation ``delta``, carried over between replays and minibatches: at each call
    ``delta`` first takes the ascent step of the previous call's gradient (``eps * sign(grad)``
    for linf, the norm's ascent direction of length ``step_size`` otherwise, step ``eps`` unless
    given, as in the paper) and is projected into the threat model (ball and mask); the model is
    then trained with cross-entropy on ``x + delta`` clamped into the bounds. ``delta`` starts at
    zero and restarts from zero when the batch shape changes; it is the method's state
    (``state_dict``), its gradient filled by the trainer's ``loss.backward()``. ``steps`` is
    accepted and ignored.
    """

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 10,
        step_size: float | None = None,
        replays: int = 8,
    ) -> None:
        super().__init__(threat)
        check_positive_int("steps", steps)
        self.replays = check_positive_int("replays", replays)
        self._step_size = _step_size(step_size)
        self.delta: Tensor | None = None

    @property
    def step_size(self) -> float:
        """The ascent step: as given, else eps."""
        return self.threat.eps if self._step_size is None else self._step_size

    def reset(self) -> None:
        """Forget the perturbation; the next call starts from zero."""
        self.delta = None

    def state_dict(self) -> dict[str, Tensor]:
        if self.delta is None:
            return {}
        state = {"delta": self.delta.detach()}
        if self.delta.grad is not None:
            state["delta.grad"] = self.delta.grad.detach()
        return state

    def load_state_dict(self, state: Mapping[str, Tensor], model: nn.Module) -> None:
        del model
        if "delta" not in state:
            self.delta = None
            return
        delta = state["delta"].detach().clone().requires_grad_(True)
        if "delta.grad" in state:
            delta.grad = state["delta.grad"].detach().clone()
        self.delta = delta

    def _current_delta(self, x: Tensor) -> Tensor:
        delta = self.delta
        if (
            delta is None
            or delta.shape != x.shape
            or delta.device != x.device
            or (delta.dtype != x.dtype)
        ):
            # Shafahi et al. start from zero; a batch of another shape starts afresh
            return torch.zeros_like(x)
        grad = delta.grad
        delta = delta.detach()
        if grad is not None:  # the ascent step from the previous call's backward pass
            # (at the current point, so that an l1 step leaves out what the box blocks there)
            point = self.threat.project(x + delta, x)
            delta = self.threat.project_delta(
                delta + self.step_size * self.threat.ascent_direction(grad, point)
            )
        return delta

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.threat.validate(x)
        x = x.detach()
        delta = self._current_delta(x).requires_grad_(True)
        self.delta = delta
        logits = model(self.threat.project(x + delta, x))
        return F.cross_entropy(logits, y), logits


class _SmallStartAscent(Method):
    """The shared shape of TRADES and MART: ``steps`` projected ascent steps on a per-sample
    objective from ``x + 0.001 * N(0, 1)`` (projected), step ``2.5 * eps / steps`` unless given
    (the rule of the ``pgd`` method: ``eps / 4`` at the default 10 steps, near the authors'
    0.007 at eps 0.031), then a loss of the clean and adversarial logits."""

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 10,
        step_size: float | None = None,
        beta: float = 6.0,
    ) -> None:
        super().__init__(threat)
        self.steps = check_positive_int("steps", steps)
        self.beta = check_finite("beta", beta)
        self.step_size = _step_size(step_size)

    def _ascend(self, model: nn.Module, x: Tensor, objective: Callable[[Tensor], Tensor]) -> Tensor:
        threat = self.threat
        size = 2.5 * threat.eps / self.steps if self.step_size is None else self.step_size
        with frozen(model):
            start = threat.project(x + SMALL_START * torch.randn_like(x), x).detach()
            return projected_ascent(
                lambda points: objective(model(points)), x, start, threat, self.steps, size
            )


@method("trades")
class TRADES(_SmallStartAscent):
    """TRADES: Zhang et al., "Theoretically principled trade-off between robustness and accuracy"
    (ICML 2019).

    The inner maximisation ascends ``KL(p(x) || p(x'))`` (``p(x)`` fixed, from the frozen model)
    by ``steps`` (10) PGD steps from ``x + 0.001 * N(0, 1)``; the model is then trained on
    :func:`trades_loss` ``CE(f(x), y) + beta * KL(p(x) || p(x'))``. ``beta`` is 6.0 (their
    CIFAR-10 and headline setting; their MNIST script uses 1.0). The step is ``2.5 * eps / steps``
    unless given (the rule of the ``pgd`` method), which at the default 10 steps is ``eps / 4``,
    near the authors' 0.007 at eps 0.031. The logits returned are the adversarial ones.
    """

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.threat.validate(x)
        x = x.detach()
        with frozen(model), torch.no_grad():
            log_p_clean = F.log_softmax(model(x), dim=1)

        def kl(logits_adv: Tensor) -> Tensor:
            log_p_adv = F.log_softmax(logits_adv, dim=1)
            return (log_p_clean.exp() * (log_p_clean - log_p_adv)).sum(dim=1)

        x_adv = self._ascend(model, x, kl)
        logits_clean, logits_adv = model(x), model(x_adv)
        return trades_loss(logits_clean, logits_adv, y, self.beta), logits_adv


@method("mart")
class MART(_SmallStartAscent):
    """MART: Wang et al., "Improving adversarial robustness requires revisiting misclassified
    examples" (ICLR 2020).

    ``x'`` is crafted by ``steps`` (10) PGD steps on the cross-entropy from
    ``x + 0.001 * N(0, 1)``; the model is trained on :func:`mart_loss`, the boosted
    cross-entropy on ``x'`` plus ``beta`` times the KL term weighted by ``1 - p_y(x)`` so that
    misclassified examples weigh more. ``beta`` is 6.0, the authors' CIFAR-10 value (the paper
    does not tune it for MNIST). The step is ``2.5 * eps / steps`` unless given (``eps / 4`` at
    10 steps, near their 0.007 at eps 0.031). The logits returned are the adversarial ones.
    """

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.threat.validate(x)
        x = x.detach()
        x_adv = self._ascend(model, x, lambda logits: F.cross_entropy(logits, y, reduction="none"))
        logits_clean, logits_adv = model(x), model(x_adv)
        return mart_loss(logits_clean, logits_adv, y, self.beta), logits_adv


@method("distillation")
class Distillation(Method):
    """Defensive distillation: Papernot, McDaniel, Wu, Jha & Swami, "Distillation as a defense
    to adversarial perturbations" (IEEE S&P 2016). A defence that MASKS gradients: kept as the
    classic example of false robustness, not to be trusted.

    One run, two phases: during the first half of the epochs (rounded up) the network is trained
    as the teacher on ``CE(logits / T, y)``; at the midpoint (``on_epoch_start``) a frozen copy
    becomes the teacher (the method's state) and the rest of the epochs fit its soft labels
    ``softmax(teacher(x) / T)`` with ``CE(logits / T, soft)``. The deployed model returns its raw
    logits (``T = 1`` at test time), about ``T`` times larger than usual, so its softmax saturates
    and cross-entropy gradients vanish: attacks on the CE loss fail while margin (CW) or DLR
    attacks do not. ``T`` is 100 unless given, the temperature of the paper's headline results
    on MNIST and CIFAR-10 (it studies T from 1 to 100). No attack runs inside, so ``threat``,
    ``steps`` and ``step_size`` are accepted and ignored. With a single epoch only the first
    phase runs.
    """

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 10,
        step_size: float | None = None,
        temperature: float = 100.0,
    ) -> None:
        super().__init__(threat)
        check_positive_int("steps", steps)
        _step_size(step_size)
        self.temperature = check_finite("temperature", temperature, strict=True)
        self.teacher: nn.Module | None = None

    @staticmethod
    def teacher_epochs(epochs: int) -> int:
        """Epochs of the first phase: the first half, rounded up."""
        return (epochs + 1) // 2

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        teacher = copy.deepcopy(model).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        return teacher

    def on_epoch_start(self, model: nn.Module, epoch: int, epochs: int) -> None:
        check_positive_int("epochs", epochs)
        check_positive_int("epoch", epoch)
        if epoch <= self.teacher_epochs(epochs):
            self.teacher = None  # (a new run with the same method starts over)
        elif self.teacher is None:
            self.teacher = self._frozen_copy(model)

    def state_dict(self) -> dict[str, Tensor]:
        if self.teacher is None:
            return {}
        return {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Tensor], model: nn.Module) -> None:
        weights = {k[len("teacher.") :]: v for k, v in state.items() if k.startswith("teacher.")}
        if not weights:
            self.teacher = None
            return
        teacher = self._frozen_copy(model)
        teacher.load_state_dict(weights)
        self.teacher = teacher

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        scaled = logits / self.temperature
        if self.teacher is None:
            return F.cross_entropy(scaled, y), logits
        with torch.no_grad():
            soft = F.softmax(self.teacher(x) / self.temperature, dim=1)
        return F.cross_entropy(scaled, soft), logits
