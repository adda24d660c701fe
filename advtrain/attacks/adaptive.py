"""Adaptive-attack wrappers: EOT for randomised defences, BPDA for non-differentiable ones.

Athalye, Carlini & Wagner, "Obfuscated gradients give a false sense of security: circumventing
defenses to adversarial examples" (ICML 2018); Tramèr, Carlini, Brendel & Madry, "On adaptive
attacks to adversarial example defenses" (NeurIPS 2020).

A defence can defeat a gradient attack without being robust: a random input transform makes
each gradient a noisy sample (stochastic gradients), and a quantising or otherwise
non-differentiable step makes it zero or useless (shattered gradients). The wrappers here are
plain modules that repair the gradient and leave the attack alone, so every attack of the
library runs on them unchanged:

- :class:`EOT` (Expectation over Transformation) averages ``samples`` stochastic passes, so the
  attack follows the expected gradient; :func:`majority_vote` and :func:`is_randomized` judge
  and detect randomised models.
- :class:`BPDA` (Backward Pass Differentiable Approximation) runs the real preprocessing on the
  forward pass and differentiates a smooth approximation of it (the identity by default) on the
  backward pass.

Example:
    >>> x_adv = PGD(eps=0.3)(EOT(defence, samples=16), x, y)
    >>> robust = (majority_vote(defence, x_adv, samples=32) == y).float().mean()
    >>> x_adv = APGD(eps=0.3)(BPDA(quantize, model), x, y)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import AdvtrainError
from ..util import check_positive_int
from .base import frozen, model_device

__all__ = [
    "BPDA",
    "EOT",
    "LogProbabilities",
    "StraightThrough",
    "is_randomized",
    "looks_like_probabilities",
    "majority_vote",
]

#: Piecewise-constant tensor operations: zero gradient almost everywhere. Inside
#: :class:`StraightThrough` each is replaced, on the backward pass only, by the identity.
STEP_FUNCTIONS = (
    torch.round,
    torch.floor,
    torch.ceil,
    torch.trunc,
    torch.sign,
    torch.fix,
    Tensor.round,
    Tensor.floor,
    Tensor.ceil,
    Tensor.trunc,
    Tensor.sign,
    Tensor.fix,
    Tensor.__floordiv__,
    torch.floor_divide,
    Tensor.floor_divide,
)


class EOT(nn.Module):
    """Expectation over Transformation: the average of ``samples`` stochastic forward passes.

    ``forward(x)`` repeats the batch ``samples`` times, runs the wrapped model once on the
    repeated batch (``chunk`` copies at a time when given) and returns the mean over the copies
    of the log-probabilities ``log_softmax(model(x))``, shape ``(N, C)``. The attack's gradient
    is therefore the average of the per-pass gradients.

    Why log-probabilities rather than raw logits: logits are defined only up to a per-pass
    shift (softmax ignores it) and their scale may vary from pass to pass (noise layers change
    it; a defence may even inflate it on purpose), so a mean of logits lets the passes with the
    largest logits outvote the rest and is the expectation of nothing the defence's decision
    depends on. Log-probabilities put every pass on one normalised scale, and their mean is the
    objective of Athalye et al.: its true-class entry is ``E[log p_y]``, so the gradient of that
    entry is exactly the mean of the per-pass cross-entropy gradients, and a difference of two
    entries is the mean of the per-pass log-probability margins. The result works as logits: its
    argmax is the class with the highest geometric-mean probability, and CE, the CW margin and
    DLR (invariant to shift and scale) all apply to it.

    The wrapped model is called as it is: attacks put it in eval mode, and a randomised defence
    must be random in eval mode (check with :func:`is_randomized`). Repeating the batch in one
    call assumes the model draws its randomness per input row; for a model that draws one
    transform per call, pass ``chunk=1`` (one copy per call).

    Args:
        model: the randomised model (any callable module returning logits ``(N, C, ...)``).
        samples: stochastic passes averaged per input (a positive integer).
        chunk: copies of the batch per forward call (default: all ``samples`` at once). It bounds
            the size of one forward call; under autograd the graphs of all chunks are kept until
            the backward pass, so bound an attack's memory with its ``batch_size`` as well.
    """

    def __init__(
        self, model: Callable[[Tensor], Tensor], samples: int = 16, *, chunk: int | None = None
    ) -> None:
        super().__init__()
        _check_callable("model", model)
        check_positive_int("samples", samples)
        if chunk is not None:
            check_positive_int("chunk", chunk)
        self.model = model
        self.samples = samples
        self.chunk = chunk

    def forward(self, x: Tensor) -> Tensor:
        step = min(self.chunk or self.samples, self.samples)
        total: Tensor | None = None
        for start in range(0, self.samples, step):
            copies = min(step, self.samples - start)
            log_probs = _log_probs(self.model, x, copies).sum(dim=0)
            total = log_probs if total is None else total + log_probs
        assert total is not None
        return total / self.samples

    def __repr__(self) -> str:
        return f"EOT({_describe(self.model)}, samples={self.samples}, chunk={self.chunk})"


class BPDA(nn.Module):
    """Backward Pass Differentiable Approximation around a non-differentiable preprocessing.

    ``forward(x)`` returns ``model(preprocess(x))`` bit for bit; on the backward pass the gradient
    flows through ``approximation(x)`` (default: the identity, the straight-through estimator)
    in place of ``preprocess``. This is the straight-through form
    ``approx(x) + (preprocess(x) - approx(x)).detach()``, written as
    ``preprocess(x).detach() + (approx(x) - approx(x).detach())``: the same value and gradient,
    but exact in floating point (``a + (p - a)`` need not round to ``p``; ``p + 0`` does).

    The approximation should be close to the preprocessing (Athalye et al.: ``g(x) ≈ f(x)``);
    the identity suits any preprocessing that keeps its output near its input (quantisation,
    JPEG, denoising). When no gradient is needed the approximation is not computed.

    Args:
        preprocess: the defence's preprocessing, a callable (function or module) on batches.
        model: the classifier applied after it.
        approximation: a differentiable callable with the same input and output shapes as
            ``preprocess`` (default ``None``: the identity).
    """

    def __init__(
        self,
        preprocess: Callable[[Tensor], Tensor],
        model: Callable[[Tensor], Tensor],
        approximation: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        _check_callable("preprocess", preprocess)
        _check_callable("model", model)
        if approximation is not None:
            _check_callable("approximation", approximation)
        self.preprocess = preprocess
        self.model = model
        self.approximation = approximation

    def forward(self, x: Tensor) -> Tensor:
        processed = self.preprocess(x)
        if torch.is_grad_enabled() and x.requires_grad:
            approx = x if self.approximation is None else self.approximation(x)
            if approx.shape != processed.shape:
                raise AdvtrainError(
                    f"approximation gives shape {tuple(approx.shape)} but preprocess gives "
                    f"{tuple(processed.shape)}"
                )
            processed = processed.detach() + (approx - approx.detach())
        return self.model(processed)

    def __repr__(self) -> str:
        approximation = "identity" if self.approximation is None else _describe(self.approximation)
        return (
            f"BPDA({_describe(self.preprocess)}, {_describe(self.model)}, "
            f"approximation={approximation})"
        )


class _StraightThroughMode(TorchFunctionMode):
    """Runs step functions as they are, but differentiates them as the identity."""

    # torch's own signature for this hook is untyped; typing it here would not match the base
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (
            func in STEP_FUNCTIONS
            and args
            and isinstance(args[0], Tensor)
            and isinstance(out, Tensor)
            and out.shape == args[0].shape
            and args[0].requires_grad
            and torch.is_grad_enabled()
        ):
            x = args[0]
            return out.detach() + (x - x.detach())
        return out


class StraightThrough(nn.Module):
    """BPDA without knowing the defence: every step function inside ``model`` gets the identity
    as its gradient (Athalye et al. 2018, the straight-through estimator).

    ``forward(x)`` returns ``model(x)`` bit for bit; while it runs, a torch function mode makes
    each piecewise-constant operation of :data:`STEP_FUNCTIONS` (``round``, ``floor``, ``ceil``,
    ``trunc``, ``sign``, floor division) pass the gradient through unchanged instead of zeroing
    it. This repairs input quantisation, bit-depth reduction and other staircase defences written
    with tensor operations, wherever they sit in the model. Steps done outside torch (NumPy, PIL)
    stay invisible to it; wrap those with :class:`BPDA`.
    """

    def __init__(self, model: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        _check_callable("model", model)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return self.model(x)
        with _StraightThroughMode():
            return self.model(x)

    def __repr__(self) -> str:
        return f"StraightThrough({_describe(self.model)})"


class LogProbabilities(nn.Module):
    """For a model that returns probabilities: ``log(p)``, which are logits again.

    Cross-entropy on probabilities treated as logits has a gradient squashed into ``[0, 1]``
    (a classic accidental mask); their logarithm gives back the logits up to a per-row shift,
    which softmax, argmax, the CW margin and DLR all ignore.
    """

    def __init__(self, model: Callable[[Tensor], Tensor], floor: float = 1e-30) -> None:
        super().__init__()
        _check_callable("model", model)
        self.model, self.floor = model, floor

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).clamp_min(self.floor).log()

    def __repr__(self) -> str:
        return f"LogProbabilities({_describe(self.model)})"


def looks_like_probabilities(outputs: Tensor, atol: float = 1e-3) -> bool:
    """Whether a batch of model outputs ``(N, C)`` are probabilities: every entry in [0, 1] and
    every row summing to 1, both within ``atol`` (the sum within ``atol * C``)."""
    if outputs.dim() != 2 or outputs.numel() == 0:
        return False
    outputs = outputs.detach().float()
    in_range = bool(((outputs >= -atol) & (outputs <= 1 + atol)).all())
    return in_range and bool(((outputs.sum(dim=1) - 1).abs() <= atol * outputs.shape[1]).all())


@torch.no_grad()
def majority_vote(
    model: nn.Module,
    x: Tensor,
    samples: int = 32,
    batch_size: int = 1000,
    *,
    separate_calls: bool = False,
) -> Tensor:
    """Labels of a randomised model: the majority over ``samples`` stochastic forward passes.

    A tie between classes is broken by the highest mean probability. The model runs in eval mode
    (restored afterwards), at most ``batch_size`` rows (inputs times copies) per forward call.
    ``separate_calls``: one copy of the inputs per forward call, for a model that draws its
    randomness once per call (:func:`draws_per_call`), whose copies inside one call would all
    share one draw.
    """
    _check_module("model", model)
    _check_batch(x)
    check_positive_int("samples", samples)
    check_positive_int("batch_size", batch_size)
    device = model_device(model, default=x.device)
    rows = max(batch_size // samples, 1) if not separate_calls else batch_size  # inputs per block
    copies = 1 if separate_calls else max(min(batch_size // rows, samples), 1)  # per call
    labels = []
    with frozen(model):
        for i in range(0, len(x), rows):
            block = x[i : i + rows].to(device)
            votes: Tensor | None = None
            probs: Tensor | None = None
            for start in range(0, samples, copies):
                log_probs = _log_probs(model, block, min(copies, samples - start))
                if log_probs.dim() != 3:
                    raise AdvtrainError("majority_vote needs a model that returns logits (N, C)")
                classes = log_probs.shape[-1]
                v = F.one_hot(log_probs.argmax(dim=-1), classes).sum(dim=0)
                p = log_probs.exp().sum(dim=0)
                votes = v if votes is None else votes + v
                probs = p if probs is None else probs + p
            assert votes is not None and probs is not None
            leaders = votes == votes.amax(dim=-1, keepdim=True)
            labels.append(probs.masked_fill(~leaders, -1.0).argmax(dim=-1).to(x.device))
    return torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64, device=x.device)


@torch.no_grad()
def is_randomized(model: nn.Module, x: Tensor, trials: int = 4, rtol: float = 1e-4) -> bool:
    """Whether repeated eval-mode forward passes on the same ``x`` disagree beyond float noise.

    Runs the model ``trials`` times (eval mode, restored afterwards) and answers True when some
    output differs from the first by more than ``rtol * (1 + max |first output|)``, a margin
    above the run-to-run noise of nondeterministic kernels.
    """
    _check_module("model", model)
    _check_batch(x)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 2:
        raise AdvtrainError(f"trials must be an integer >= 2, got {trials!r}")
    if not (isinstance(rtol, (int, float)) and 0 <= rtol < float("inf")):
        raise AdvtrainError(f"rtol must be finite and >= 0, got {rtol!r}")
    x = x.to(model_device(model, default=x.device))
    with frozen(model):
        first = model(x)
        tolerance = rtol * (1.0 + float(first.abs().amax())) if first.numel() else 0.0
        for _ in range(trials - 1):
            if float((model(x) - first).abs().amax()) > tolerance:
                return True
    return False


def draws_per_call(model: nn.Module, x: Tensor, rtol: float = 1e-4) -> bool:
    """Whether a randomised model draws its randomness once per forward call rather than per
    input row (a random resize-and-pad drawn once per call, as in Xie et al. 2018's code).

    Runs the model once on ``x`` twice over in one batch: the two copies agree (beyond float
    noise, ``rtol`` as in :func:`is_randomized`) when every row of a call shares one draw. Then
    EOT and the majority vote must sample across calls (``EOT(chunk=1)``,
    ``majority_vote(separate_calls=True)``): copies inside one call would all see one draw.
    Meaningful for a model :func:`is_randomized` calls random; a deterministic one agrees too.
    """
    _check_module("model", model)
    _check_batch(x)
    x = x.to(model_device(model, default=x.device))
    with frozen(model):
        out = model(torch.cat([x, x]))
    first, second = out[: len(x)], out[len(x) :]
    tolerance = rtol * (1.0 + float(first.abs().amax())) if first.numel() else 0.0
    return bool(float((first - second).abs().amax()) <= tolerance) if first.numel() else False


# ---------------------------------------------------------------------- helpers
def _log_probs(model: Callable[[Tensor], Tensor], x: Tensor, copies: int) -> Tensor:
    """Log-probabilities of ``copies`` stochastic passes over ``x`` in one call, shape
    ``(copies, N, C, ...)``."""
    repeated = x.unsqueeze(0).expand(copies, *x.shape).reshape(copies * x.shape[0], *x.shape[1:])
    out = model(repeated)
    if not isinstance(out, Tensor) or out.dim() < 2:
        raise AdvtrainError("the wrapped model must return logits of shape (N, C, ...)")
    return F.log_softmax(out, dim=1).reshape(copies, x.shape[0], *out.shape[1:])


def _describe(fn: object) -> str:
    """A one-line name for a callable: a module's one-line repr or class name, a function's name."""
    if isinstance(fn, nn.Module):
        text = repr(fn)
        return text if "\n" not in text else type(fn).__name__
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) else repr(fn)


def _check_callable(name: str, value: object) -> None:
    if not callable(value):
        raise AdvtrainError(f"{name} must be callable, got {type(value).__name__}")


def _check_module(name: str, value: object) -> None:
    if not isinstance(value, nn.Module):
        raise AdvtrainError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")


def _check_batch(x: object) -> None:
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise AdvtrainError("x must be a floating-point batch tensor of shape (N, ...)")
