"""Training methods, each a function ``(model, x, y) -> (loss, logits)`` built for a threat model.

The loss is the batch mean to minimise; the logits are those of the inputs the model was trained
on in that step (adversarial ones for adversarial methods), for the running accuracy.

A method is registered by name with :func:`method`; :func:`make_method` builds the loss
function the trainer calls on every batch. The adversarial example inside a loss is crafted
with the model frozen (eval mode, no parameter gradients), as every advtrain attack does.

The trainer's side of the contract
----------------------------------
A loss function may carry optional attributes; a trainer must honour them:

``replays`` (int, 1 when absent)
    Call the loss function this many times on the same minibatch, with
    ``zero_grad(); loss.backward(); optimizer.step()`` after each call, and run
    ``ceil(epochs / replays)`` epochs so that the number of gradient steps stays that of
    ``epochs`` epochs (free adversarial training).
``on_epoch_start(model, epoch, epochs)``
    Call it before each epoch (``epoch`` counts from 1, ``epochs`` is the number of epochs the
    trainer runs); methods with phases (distillation) switch there.
``uses_input_grad`` (bool)
    The loss function keeps a perturbation with ``requires_grad=True`` and reads its ``.grad``,
    filled by the trainer's ``loss.backward()``, at its next call: the trainer must call
    ``backward()`` on the returned loss (not ``torch.autograd.grad`` on the parameters only).

:func:`mix` blends any method with clean cross-entropy and keeps these attributes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import PGD, frozen
from ..errors import AdvtrainError, unknown
from ..threat import ThreatModel
from ..util import check_finite, check_positive_int

LossFn = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]
MethodFactory = Callable[..., LossFn]
METHODS: dict[str, MethodFactory] = {}

#: The optional attributes of a loss function that a trainer honours (see the module docstring).
CONTRACT_ATTRIBUTES = ("replays", "on_epoch_start", "uses_input_grad")

#: Standard deviation of the Gaussian start of the TRADES and MART inner maximisations.
SMALL_START = 0.001


def method(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Register a method factory under ``name``."""

    def decorate(factory: MethodFactory) -> MethodFactory:
        METHODS[name] = factory
        return factory

    return decorate


def make_method(name: str, threat: ThreatModel, **options: Any) -> LossFn:
    """The batch loss of method ``name`` for ``threat``; unknown options are an error.

    Every method takes the options of the attack inside training (``steps``, ``step_size``),
    whether it uses them or not, so that a trainer can pass them to any method.
    """
    try:
        factory = METHODS[name]
    except KeyError:
        raise unknown("method", name, list(METHODS)) from None
    try:
        return factory(threat, **options)
    except TypeError as exc:
        raise AdvtrainError(f"method {name!r}: {exc}") from None


# ---------------------------------------------------------------------- option checks


def _step_size(step_size: object, default: float) -> float:
    return default if step_size is None else check_finite("step_size", step_size)


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


# ---------------------------------------------------------------------- helpers


def _ascend(
    model: nn.Module,
    x: Tensor,
    threat: ThreatModel,
    steps: int,
    step_size: float,
    objective: Callable[[Tensor], Tensor],
) -> Tensor:
    """PGD on ``objective(logits)`` (per sample) from ``x + 0.001 * N(0, 1)``, last iterate.

    The start of TRADES and MART; each step goes along the norm's ascent direction and is
    projected into the threat model (ball, bounds, mask). The model is frozen meanwhile.
    """
    with frozen(model):
        x_adv = threat.project(x + SMALL_START * torch.randn_like(x), x).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                value = objective(model(x_adv)).sum()
            (grad,) = torch.autograd.grad(value, x_adv)
            x_adv = threat.project(
                x_adv.detach() + step_size * threat.ascent_direction(grad, x_adv.detach()), x
            ).detach()
    return x_adv


def _copy_contract(source: object, target: Any) -> None:
    for name in CONTRACT_ATTRIBUTES:
        if hasattr(source, name):
            setattr(target, name, getattr(source, name))


def mix(loss_fn: LossFn, adv_ratio: float) -> LossFn:
    """Blend a method with clean training: ``r * method_loss + (1 - r) * CE(model(x), y)``.

    ``adv_ratio`` ``r`` lies in [0, 1]: 1 is the method alone (returned as it is computed, with no
    extra clean forward pass), 0 is standard training (the method is not called at all, so no
    attack is run). The returned logits are the method's, or the clean ones at ``r = 0``. The
    trainer-contract attributes (``replays``, ``on_epoch_start``, ``uses_input_grad``) carry over;
    ``.method`` is the wrapped loss function and ``.adv_ratio`` the ratio.
    """
    ratio = check_finite("adv_ratio", adv_ratio)
    if ratio > 1:
        raise AdvtrainError(f"adv_ratio must lie in [0, 1], got {adv_ratio!r}")
    if not callable(loss_fn):
        raise AdvtrainError(f"mix needs a loss function, got {type(loss_fn).__name__}")

    def mixed(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if ratio == 0:
            logits = model(x)
            return F.cross_entropy(logits, y), logits
        loss, logits = loss_fn(model, x, y)
        if ratio == 1:
            return loss, logits
        clean = F.cross_entropy(model(x), y)
        return ratio * loss + (1 - ratio) * clean, logits

    _copy_contract(loss_fn, mixed)
    mixed.method = loss_fn  # type: ignore[attr-defined]
    mixed.adv_ratio = ratio  # type: ignore[attr-defined]
    return mixed


# ---------------------------------------------------------------------- methods


@method("standard")
def standard(threat: ThreatModel, *, steps: int = 10, step_size: float | None = None) -> LossFn:
    """Empirical risk minimisation on clean inputs (the undefended baseline); no attack."""
    del threat, steps, step_size

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    return loss


@method("pgd")
def pgd(threat: ThreatModel, *, steps: int = 10, step_size: float | None = None) -> LossFn:
    """PGD adversarial training (Madry et al., ICLR 2018): cross-entropy on the PGD point.

    Each batch is replaced by the last iterate of ``steps`` PGD steps from a random start,
    step ``2.5 * eps / steps`` unless given.
    """
    if step_size is None:
        step_size = 2.5 * threat.eps / steps
    attack = PGD(threat, steps=steps, step_size=step_size, early_stop=False)

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(attack(model, x, y))
        return F.cross_entropy(logits, y), logits

    return loss


@method("fgsm-rs")
def fgsm_rs(threat: ThreatModel, *, steps: int = 10, step_size: float | None = None) -> LossFn:
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
    check_positive_int("steps", steps)
    size = _step_size(step_size, 1.25 * threat.eps)

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with frozen(model):
            start = (x + threat.random_delta(x)).requires_grad_(True)
            with torch.enable_grad():
                value = F.cross_entropy(model(start), y, reduction="sum")
            (grad,) = torch.autograd.grad(value, start)
            x_adv = threat.project(
                start.detach() + size * threat.ascent_direction(grad, start.detach()), x
            )
        logits = model(x_adv.detach())
        return F.cross_entropy(logits, y), logits

    return loss


class FreeLoss:
    """The loss function of free adversarial training (see :func:`free`).

    ``delta`` is the perturbation carried between calls (``None`` before the first one).
    """

    uses_input_grad = True

    def __init__(self, threat: ThreatModel, replays: int, step_size: float) -> None:
        self.threat = threat
        self.replays = replays
        self.step_size = step_size
        self.delta: Tensor | None = None

    def reset(self) -> None:
        """Forget the perturbation; the next call starts from zero."""
        self.delta = None

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

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.threat.validate(x)
        x = x.detach()
        delta = self._current_delta(x).requires_grad_(True)
        self.delta = delta
        logits = model(self.threat.project(x + delta, x))
        return F.cross_entropy(logits, y), logits


@method("free")
def free(
    threat: ThreatModel, *, steps: int = 10, step_size: float | None = None, replays: int = 8
) -> LossFn:
    """Free adversarial training: Shafahi et al., "Adversarial training for free!" (NeurIPS 2019).

    Each minibatch is replayed ``replays`` times (``m``, default 8, the value of the paper's
    CIFAR-10 results). One backward pass gives both the parameter gradient and the gradient of
    a perturbation ``delta``, carried over between replays and minibatches: at each call
    ``delta`` first takes the ascent step of the previous call's gradient (``eps * sign(grad)``
    for linf, the norm's ascent direction of length ``step_size`` otherwise, step ``eps`` unless
    given, as in the paper) and is projected into the threat model (ball and mask); the model is
    then trained with cross-entropy on ``x + delta`` clamped into the bounds. ``delta`` starts at
    zero and restarts from zero when the batch shape changes.

    Trainer contract: ``replays`` (call it that many times per minibatch, run
    ``ceil(epochs / replays)`` epochs) and ``uses_input_grad`` (``delta.grad`` comes from the
    trainer's ``loss.backward()``). ``steps`` is accepted and ignored.
    """
    check_positive_int("steps", steps)
    check_positive_int("replays", replays)
    return FreeLoss(threat, replays, _step_size(step_size, threat.eps))


@method("trades")
def trades(
    threat: ThreatModel, *, steps: int = 10, step_size: float | None = None, beta: float = 6.0
) -> LossFn:
    """TRADES: Zhang et al., "Theoretically principled trade-off between robustness and accuracy"
    (ICML 2019).

    The inner maximisation ascends ``KL(p(x) || p(x'))`` (``p(x)`` fixed, from the frozen model)
    by ``steps`` (10) PGD steps from ``x + 0.001 * N(0, 1)``; the model is then trained on
    :func:`trades_loss` ``CE(f(x), y) + beta * KL(p(x) || p(x'))``. ``beta`` is 6.0 (their
    CIFAR-10 and headline setting; their MNIST script uses 1.0). The step is ``2.5 * eps / steps``
    unless given (the rule of the ``pgd`` method), which at the default 10 steps is ``eps / 4``,
    near the authors' 0.007 at eps 0.031. The logits returned are the adversarial ones.
    """
    check_positive_int("steps", steps)
    beta = check_finite("beta", beta)
    size = _step_size(step_size, 2.5 * threat.eps / steps)

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        threat.validate(x)
        x = x.detach()
        with frozen(model), torch.no_grad():
            log_p_clean = F.log_softmax(model(x), dim=1)

        def kl(logits_adv: Tensor) -> Tensor:
            log_p_adv = F.log_softmax(logits_adv, dim=1)
            return (log_p_clean.exp() * (log_p_clean - log_p_adv)).sum(dim=1)

        x_adv = _ascend(model, x, threat, steps, size, kl)
        logits_clean, logits_adv = model(x), model(x_adv)
        return trades_loss(logits_clean, logits_adv, y, beta), logits_adv

    return loss


@method("mart")
def mart(
    threat: ThreatModel, *, steps: int = 10, step_size: float | None = None, beta: float = 6.0
) -> LossFn:
    """MART: Wang et al., "Improving adversarial robustness requires revisiting misclassified
    examples" (ICLR 2020).

    ``x'`` is crafted by ``steps`` (10) PGD steps on the cross-entropy from
    ``x + 0.001 * N(0, 1)``; the model is trained on :func:`mart_loss`, the boosted
    cross-entropy on ``x'`` plus ``beta`` times the KL term weighted by ``1 - p_y(x)`` so that
    misclassified examples weigh more. ``beta`` is 6.0, the authors' CIFAR-10 value (the paper
    does not tune it for MNIST). The step is ``2.5 * eps / steps`` unless given (``eps / 4`` at
    10 steps, near their 0.007 at eps 0.031). The logits returned are the adversarial ones.
    """
    check_positive_int("steps", steps)
    beta = check_finite("beta", beta)
    size = _step_size(step_size, 2.5 * threat.eps / steps)

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        threat.validate(x)
        x = x.detach()
        x_adv = _ascend(
            model,
            x,
            threat,
            steps,
            size,
            lambda logits: F.cross_entropy(logits, y, reduction="none"),
        )
        logits_clean, logits_adv = model(x), model(x_adv)
        return mart_loss(logits_clean, logits_adv, y, beta), logits_adv

    return loss


class DistillationLoss:
    """The loss function of defensive distillation (see :func:`distillation`).

    ``teacher`` is ``None`` during the first phase, then the frozen copy whose soft labels the
    second phase fits.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.teacher: nn.Module | None = None

    @staticmethod
    def teacher_epochs(epochs: int) -> int:
        """Epochs of the first phase: the first half, rounded up."""
        return (epochs + 1) // 2

    def on_epoch_start(self, model: nn.Module, epoch: int, epochs: int) -> None:
        check_positive_int("epochs", epochs)
        check_positive_int("epoch", epoch)
        if epoch <= self.teacher_epochs(epochs):
            self.teacher = None  # (a new run with the same loss function starts over)
        elif self.teacher is None:
            teacher = copy.deepcopy(model).eval()
            for parameter in teacher.parameters():
                parameter.requires_grad_(False)
            self.teacher = teacher

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        scaled = logits / self.temperature
        if self.teacher is None:
            return F.cross_entropy(scaled, y), logits
        with torch.no_grad():
            soft = F.softmax(self.teacher(x) / self.temperature, dim=1)
        return F.cross_entropy(scaled, soft), logits


@method("distillation")
def distillation(
    threat: ThreatModel,
    *,
    steps: int = 10,
    step_size: float | None = None,
    temperature: float = 100.0,
) -> LossFn:
    """Defensive distillation: Papernot, McDaniel, Wu, Jha & Swami, "Distillation as a defense
    to adversarial perturbations" (IEEE S&P 2016). A defence that MASKS gradients: kept as the
    classic example of false robustness, not to be trusted.

    One run, two phases: during the first half of the epochs (rounded up) the network is trained
    as the teacher on ``CE(logits / T, y)``; at the midpoint (``on_epoch_start``) a frozen copy
    becomes the teacher and the rest of the epochs fit its soft labels
    ``softmax(teacher(x) / T)`` with ``CE(logits / T, soft)``. The deployed model returns its raw
    logits (``T = 1`` at test time), about ``T`` times larger than usual, so its softmax saturates
    and cross-entropy gradients vanish: attacks on the CE loss fail while margin (CW) or DLR
    attacks do not. ``T`` is 100 unless given, the temperature of the paper's headline results
    on MNIST and CIFAR-10 (it studies T from 1 to 100). No attack runs inside, so ``threat``,
    ``steps`` and ``step_size`` are accepted and ignored. With a single epoch only the first
    phase runs. Trainer contract: ``on_epoch_start``.
    """
    del threat
    check_positive_int("steps", steps)
    if step_size is not None:
        check_finite("step_size", step_size)
    return DistillationLoss(check_finite("temperature", temperature, strict=True))
