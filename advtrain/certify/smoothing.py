"""Randomized smoothing: Cohen, Rosenfeld & Kolter, "Certified adversarial robustness via
randomized smoothing" (ICML 2019), for any model that returns logits.

The smoothed classifier ``g(x) = argmax_c P(f(x + e) = c)``, ``e ~ N(0, sigma^2 I)``, where ``f``
is the base model's top class, is robust in l2: when class ``c_A`` has probability at least
``p_A`` under the noise, ``g`` returns ``c_A`` everywhere within radius ``sigma * Phi^-1(p_A)``
of ``x`` (their Theorem 1). Its certificates belong to the smoothed classifier, not to the
model: the model itself may be broken well inside that radius.

:class:`Smoothed` runs the paper's two Monte Carlo procedures, as their reference code
(github.com/locuslab/smoothing, ``code/core.py``) does:

``predict`` (PREDICT)
    ``n`` noisy copies of each point; the two most frequent classes, with counts ``n_A`` and
    ``n_B``; abstain (label :data:`ABSTAIN`) unless a two-sided binomial test of ``n_A`` out of
    ``n_A + n_B`` against 1/2 has p-value at most ``alpha`` (``scipy.stats.binomtest``; SciPy
    removed the ``binom_test`` of the reference code). With probability at least ``1 - alpha`` a
    returned class is ``g(x)``.
``certify`` (CERTIFY)
    ``n0`` selection samples pick ``c_A`` (the most frequent class); ``n`` fresh estimation
    samples count it (``n_A``); ``pA_lower`` is the one-sided Clopper–Pearson lower bound of
    ``n_A / n`` at level ``alpha`` (the lower end of the two-sided exact interval at confidence
    ``1 - 2 * alpha``, as the reference code's ``proportion_confint(n_A, n, alpha=2 * alpha,
    method="beta")``); abstain when ``pA_lower < 1/2``, else certify radius
    ``sigma * Phi^-1(pA_lower)``. With probability at least ``1 - alpha`` a certified point's
    class is ``g(x)`` and ``g`` is constant within the radius.

The paper's defaults are ``n0 = 100``, ``n = 100,000``, ``alpha = 0.001`` (the reference
``certify.py``); ``predict`` defaults to ``n = 100`` for quick runs (the reference ``predict.py``
defaults to 100,000 at ``alpha = 0.001``). ``n`` bounds the largest radius
that can be certified: even with every sample on ``c_A``, ``pA_lower = alpha^(1/n)``, so the
radius is at most ``sigma * Phi^-1(alpha^(1/n))`` (:func:`max_certifiable_radius`).

``sigma`` is in the units of the inputs (pixels in [0, 1] for advtrain's images). As in the
paper and its code, the noise is added to the inputs and NOT clipped to the input box: the
guarantee is a statement about Gaussian convolution, which clipping would break.

Noise is drawn by a ``torch.Generator`` seeded once per :class:`Smoothed` on the model's device,
in batches of ``batch_size`` noisy inputs: a point's samples are split over several batches when
there are more than ``batch_size`` of them, and a batch holds the samples of several points when
there are fewer. Two :class:`Smoothed` built alike with the same seed, given the same calls,
return the same results; each call draws fresh noise from the generator's stream, so the
selection and estimation samples of ``certify`` are independent, as the paper requires. The
model runs in eval mode under ``torch.no_grad()``; its modes are restored afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..util import check_finite, check_positive_int, evaluating

__all__ = [
    "ABSTAIN",
    "Certificate",
    "Smoothed",
    "SmoothedPrediction",
    "SmoothingSettings",
    "clopper_pearson_lower",
    "max_certifiable_radius",
]

#: The label of a point the smoothed classifier abstains on (the reference code's ``ABSTAIN``).
ABSTAIN = -1

#: Noisy inputs per forward pass unless told (the reference ``certify.py``'s ``--batch``).
DEFAULT_BATCH_SIZE = 1000


@dataclass(frozen=True)
class SmoothingSettings:
    """How a result was computed: the noise level, the sample counts, the level, the batching
    and the seed of the generator (``n0`` is 0 for ``predict``, which has no selection step)."""

    procedure: str
    sigma: float
    n0: int
    n: int
    alpha: float
    batch_size: int
    seed: int
    n_classes: int


@dataclass(frozen=True, eq=False)
class Certificate:
    """What :meth:`Smoothed.certify` returns for ``N`` points (tensors on the CPU).

    ``prediction`` (N,) int64: ``c_A``, or :data:`ABSTAIN`; ``radius`` (N,) float64: the
    certified l2 radius ``sigma * Phi^-1(pA_lower)``, 0 where abstained; ``abstained`` (N,)
    bool; ``counts`` (N, C) int64: the estimation samples per class (``n`` per row);
    ``selection_counts`` (N, C) int64: the ``n0`` selection samples; ``pA_lower`` (N,) float64:
    the Clopper–Pearson lower bound of ``P(f(x + e) = c_A)`` at level ``alpha``.
    """

    prediction: Tensor
    radius: Tensor
    abstained: Tensor
    counts: Tensor
    selection_counts: Tensor
    pA_lower: Tensor
    settings: SmoothingSettings

    def __len__(self) -> int:
        return int(self.prediction.shape[0])


@dataclass(frozen=True, eq=False)
class SmoothedPrediction:
    """What :meth:`Smoothed.predict` returns for ``N`` points (tensors on the CPU).

    ``prediction`` (N,) int64: the top class, or :data:`ABSTAIN`; ``abstained`` (N,) bool;
    ``counts`` (N, C) int64 (``n`` per row); ``p_value`` (N,) float64: the two-sided binomial
    test of the top count against the runner-up's at 1/2 (abstain when it exceeds ``alpha``).
    """

    prediction: Tensor
    abstained: Tensor
    counts: Tensor
    p_value: Tensor
    settings: SmoothingSettings

    def __len__(self) -> int:
        return int(self.prediction.shape[0])


# ---------------------------------------------------------------------- statistics


def _check_alpha(alpha: object) -> float:
    if (
        isinstance(alpha, (int, float))
        and not isinstance(alpha, bool)
        and math.isfinite(alpha)
        and 0 < alpha < 1
    ):
        return float(alpha)
    raise AdvtrainError(f"alpha must be a number in (0, 1), got {alpha!r}")


def clopper_pearson_lower(successes: Tensor | np.ndarray, n: int, alpha: float) -> np.ndarray:
    """The one-sided ``1 - alpha`` Clopper–Pearson lower bound of a binomial proportion for each
    count in ``successes`` out of ``n``: ``Beta.ppf(alpha, k, n - k + 1)``, 0 for ``k = 0``.

    The lower end of the exact two-sided interval at confidence ``1 - 2 * alpha``
    (``scipy.stats.binomtest(k, n).proportion_ci(1 - 2 * alpha, "exact").low``, statsmodels'
    ``proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``).
    """
    alpha = _check_alpha(alpha)
    check_positive_int("n", n)
    k = np.asarray(successes.cpu() if isinstance(successes, Tensor) else successes, np.float64)
    if np.any((k < 0) | (k > n)):
        raise AdvtrainError(f"successes must lie in [0, {n}]")
    safe = np.maximum(k, 1.0)  # Beta(0, .) is undefined; the bound is 0 there
    lower = stats.beta.ppf(alpha, safe, n - k + 1)
    return np.where(k == 0, 0.0, lower)


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius ``certify`` can return with ``n`` estimation samples: every sample on
    ``c_A`` gives ``pA_lower = alpha^(1/n)``, hence ``sigma * Phi^-1(alpha^(1/n))``."""
    sigma = check_finite("sigma", sigma, strict=True)
    return sigma * float(stats.norm.ppf(float(clopper_pearson_lower(np.array([n]), n, alpha)[0])))


def _binomial_p_values(top: np.ndarray, runner_up: np.ndarray) -> np.ndarray:
    """Two-sided binomial test of ``top`` successes in ``top + runner_up`` trials at 1/2."""
    return np.array(
        [
            stats.binomtest(int(a), int(a + b), p=0.5).pvalue if a + b > 0 else 1.0
            for a, b in zip(top, runner_up)
        ],
        dtype=np.float64,
    )


# ---------------------------------------------------------------------- the smoothed classifier


def _model_device(model: nn.Module) -> torch.device | None:
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return None


class Smoothed:
    """The smoothed classifier of ``model`` (any ``nn.Module`` returning logits ``(B, C)``) at
    noise level ``sigma`` (see the module docstring).

    Args:
        model: the base classifier; its top logit is its class.
        sigma: standard deviation of the Gaussian noise, in input units (> 0).
        n_classes: number of classes (default: the width of the model's logits).
        batch_size: noisy inputs per forward pass.
        seed: seed of the noise generator.
    """

    def __init__(
        self,
        model: nn.Module,
        sigma: float,
        n_classes: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise AdvtrainError(f"Smoothed needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.sigma = check_finite("sigma", sigma, strict=True)
        if n_classes is not None and (check_positive_int("n_classes", n_classes) < 2):
            raise AdvtrainError(f"n_classes must be at least 2, got {n_classes}")
        self.n_classes = n_classes
        self.batch_size = check_positive_int("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise AdvtrainError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    # ------------------------------------------------------------------ sampling

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(self.seed)
            self._generators[device] = generator
        return generator

    def _inputs(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise AdvtrainError("x must be a tensor batch (N, ...)")
        if x.shape[0] == 0:
            raise AdvtrainError("x holds no points")
        if not x.is_floating_point():
            raise AdvtrainError(f"x must hold floating-point inputs, got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise AdvtrainError("x holds NaN or infinite values")
        device = _model_device(self.model)
        return x.detach() if device is None else x.detach().to(device)

    def _classes(self, logits: Tensor) -> int:
        if logits.dim() != 2:
            raise AdvtrainError(
                f"the model must return logits (B, C), got shape {tuple(logits.shape)}"
            )
        width = int(logits.shape[1])
        if self.n_classes is None:
            if width < 2:
                raise AdvtrainError("the model returns one logit: smoothing needs >= 2 classes")
            self.n_classes = width
        elif width > self.n_classes:
            raise AdvtrainError(f"the model returns {width} logits for n_classes={self.n_classes}")
        return self.n_classes

    def sample_counts(self, x: Tensor, num: int) -> Tensor:
        """For each point of ``x``, how many of ``num`` noisy copies ``x + N(0, sigma^2 I)`` the
        model puts in each class: an ``(N, C)`` int64 tensor on the CPU, rows summing to
        ``num``."""
        num = check_positive_int("n", num)
        x = self._inputs(x)
        n_points = int(x.shape[0])
        generator = self._generator(x.device)
        counts = torch.zeros(0, dtype=torch.int64, device=x.device)
        with evaluating(self.model):
            for start in range(0, n_points * num, self.batch_size):
                stop = min(start + self.batch_size, n_points * num)
                owner = torch.arange(start, stop, device=x.device) // num
                clean = x[owner]
                noise = torch.randn(
                    clean.shape, generator=generator, device=x.device, dtype=clean.dtype
                )
                logits = self.model(noise.mul_(self.sigma).add_(clean))
                n_classes = self._classes(logits)
                if start == 0:
                    counts = torch.zeros(n_points * n_classes, dtype=torch.int64, device=x.device)
                top = logits.argmax(dim=1)
                counts.index_add_(0, owner * n_classes + top, torch.ones_like(top))
        return counts.view(n_points, -1).cpu()

    # ------------------------------------------------------------------ the two procedures

    def _settings(self, procedure: str, n0: int, n: int, alpha: float) -> SmoothingSettings:
        return SmoothingSettings(
            procedure=procedure,
            sigma=self.sigma,
            n0=n0,
            n=n,
            alpha=alpha,
            batch_size=self.batch_size,
            seed=self.seed,
            n_classes=self.n_classes or 0,
        )

    def predict(self, x: Tensor, n: int = 100, alpha: float = 0.001) -> SmoothedPrediction:
        """PREDICT of Cohen et al. for each point of ``x``: the top class of ``n`` noisy
        samples, or :data:`ABSTAIN` when the binomial test of its count against the
        runner-up's at 1/2 has p-value above ``alpha``."""
        n = check_positive_int("n", n)
        alpha = _check_alpha(alpha)
        counts = self.sample_counts(x, n)
        top2 = counts.topk(2, dim=1)
        p_values = torch.from_numpy(
            _binomial_p_values(top2.values[:, 0].numpy(), top2.values[:, 1].numpy())
        )
        abstained = p_values > alpha
        top = top2.indices[:, 0]
        prediction = torch.where(abstained, torch.full_like(top, ABSTAIN), top)
        return SmoothedPrediction(
            prediction, abstained, counts, p_values, self._settings("predict", 0, n, alpha)
        )

    def certify(
        self, x: Tensor, n0: int = 100, n: int = 100_000, alpha: float = 0.001
    ) -> Certificate:
        """CERTIFY of Cohen et al. for each point of ``x``: ``c_A`` from ``n0`` selection
        samples, its count among ``n`` fresh samples, the Clopper–Pearson lower bound
        ``pA_lower`` at level ``alpha``; :data:`ABSTAIN` (radius 0) when ``pA_lower < 1/2``,
        else ``c_A`` with radius ``sigma * Phi^-1(pA_lower)``."""
        n0 = check_positive_int("n0", n0)
        n = check_positive_int("n", n)
        alpha = _check_alpha(alpha)
        selection = self.sample_counts(x, n0)
        chosen = selection.argmax(dim=1)
        counts = self.sample_counts(x, n)
        n_a = counts.gather(1, chosen[:, None]).squeeze(1)
        lower = torch.from_numpy(clopper_pearson_lower(n_a.numpy(), n, alpha))
        abstained = lower < 0.5
        radius = torch.from_numpy(self.sigma * stats.norm.ppf(lower.numpy()))
        radius = torch.where(abstained, torch.zeros_like(radius), radius)
        prediction = torch.where(abstained, torch.full_like(chosen, ABSTAIN), chosen)
        return Certificate(
            prediction=prediction,
            radius=radius,
            abstained=abstained,
            counts=counts,
            selection_counts=selection,
            pA_lower=lower,
            settings=self._settings("certify", n0, n, alpha),
        )
