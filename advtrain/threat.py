"""The threat model: which perturbations an adversary may make.

A :class:`ThreatModel` is a norm ball of radius ``eps`` around each input, intersected with the
box of valid inputs (``lower``/``upper``, scalars or per-feature tensors) and restricted to the
features that may change (``mask``; immutable features of tabular data stay fixed). For an
encoded table it also holds the table's :class:`~advtrain.feasibility.FeatureConstraints`
(integers, one-hot categories, directions, linear rules), which its projection repairs and its
``contains`` requires. Attacks ask it for random starts, for the steepest-ascent direction of a
gradient and for the projection back into the allowed set, so one attack loop serves every norm
and every constraint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .device_sync import compaction_interval
from .errors import ThreatModelError
from .feasibility import FeatureConstraints

Norm = Literal["linf", "l2", "l1"]
NORMS: tuple[str, ...] = ("linf", "l2", "l1")
Bound = float | Tensor

#: Absolute slack allowed by :meth:`ThreatModel.contains` for float32 rounding.
DEFAULT_ATOL = 1e-5


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector so it broadcasts against a batch shaped like ``like``."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Uniform draws in [0, 1) of ``like``'s dtype and device."""
    return torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)


def lp_norm(delta: Tensor, norm: str) -> Tensor:
    """Per-sample norm of a batch of perturbations."""
    flat = _flat(delta)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    if norm == "l1":
        return flat.abs().sum(dim=1)
    raise ThreatModelError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")


def project_l1_ball(delta: Tensor, eps: float) -> Tensor:
    """Euclidean projection of each sample onto the l1 ball of radius ``eps``.

    The sort-based algorithm of Duchi et al., "Efficient projections onto the l1-ball for
    learning in high dimensions" (ICML 2008), vectorised over the batch.
    """
    flat = _flat(delta)
    magnitude = flat.abs()
    outside = magnitude.sum(dim=1) > eps
    if compaction_interval(delta.device) == 1 and not bool(outside.any()):  # no read-back on a GPU
        return delta
    if eps == 0:
        return torch.zeros_like(delta)
    sorted_mag, _ = magnitude.sort(dim=1, descending=True)
    cumulative = sorted_mag.cumsum(dim=1)
    ranks = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    candidates = sorted_mag - (cumulative - eps) / ranks > 0
    rho = candidates.to(torch.int64).cumsum(dim=1).argmax(dim=1, keepdim=True)  # last True
    theta = (cumulative.gather(1, rho) - eps) / (rho + 1).to(flat.dtype)
    projected = flat.sign() * (magnitude - theta).clamp_min(0)
    projected = torch.where(outside.unsqueeze(1), projected, flat)
    return projected.reshape(delta.shape)


@dataclass(frozen=True, eq=False)
class ThreatModel:
    """An ``eps``-ball in the ``norm``, inside input bounds, over the changeable features.

    Args:
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        eps: radius of the ball, >= 0; ``inf`` means unbounded (minimum-norm attacks only).
        lower: smallest valid input, a scalar or a tensor broadcastable to one sample's shape.
        upper: largest valid input, likewise.
        mask: optional tensor broadcastable to one sample's shape, nonzero/True where the
            feature may be changed; features where it is zero/False stay fixed.
        constraints: optional constraints of encoded table rows (``(n, d)`` inputs): every
            projected point satisfies them, and :meth:`contains` requires them.
    """

    norm: Norm = "linf"
    eps: float = 0.3
    lower: Bound = 0.0
    upper: Bound = 1.0
    mask: Tensor | None = None
    constraints: FeatureConstraints | None = None

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ThreatModelError(f"unknown norm {self.norm!r}; choose one of: {', '.join(NORMS)}")
        try:
            eps = float(self.eps)
        except (TypeError, ValueError):
            raise ThreatModelError(f"eps must be a number, got {self.eps!r}") from None
        if math.isnan(eps) or eps < 0:
            raise ThreatModelError(f"eps must be >= 0 (inf: unbounded), got {self.eps!r}")
        object.__setattr__(self, "eps", eps)
        for name in ("lower", "upper"):
            value = getattr(self, name)
            if isinstance(value, Tensor):
                value = value.detach().to(torch.float32)
                if not bool(torch.isfinite(value).all()):
                    raise ThreatModelError(f"{name} bound must be finite")
            else:
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise ThreatModelError(f"{name} bound must be a number or tensor") from None
                if not math.isfinite(value):
                    raise ThreatModelError(f"{name} bound must be finite, got {value}")
            object.__setattr__(self, name, value)
        lower, upper = torch.as_tensor(self.lower), torch.as_tensor(self.upper)
        try:
            ordered = bool((lower <= upper).all())
        except RuntimeError:
            raise ThreatModelError(
                f"lower bound shape {tuple(lower.shape)} does not match upper bound shape "
                f"{tuple(upper.shape)}"
            ) from None
        if not ordered:
            raise ThreatModelError("lower bound must be <= upper bound for every feature")
        if self.mask is not None:
            if not isinstance(self.mask, Tensor):
                raise ThreatModelError("mask must be a tensor of the features that may change")
            object.__setattr__(self, "mask", self.mask.detach().to(torch.bool))
        if self.constraints is not None and not isinstance(self.constraints, FeatureConstraints):
            raise ThreatModelError("constraints must be a FeatureConstraints")

    @property
    def bounded(self) -> bool:
        """False for an unbounded threat model (``eps = inf``), used by minimum-norm attacks."""
        return math.isfinite(self.eps)

    # ------------------------------------------------------------------ construction helpers
    def replace(self, **changes: Any) -> ThreatModel:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def validate(self, x: Tensor) -> None:
        """Check that bounds and mask fit a batch ``x`` and that ``x`` lies inside the bounds."""
        sample_shape = tuple(x.shape[1:])
        for name in ("lower", "upper", "mask"):
            value = getattr(self, name)
            if isinstance(value, Tensor) and not _broadcastable(tuple(value.shape), sample_shape):
                raise ThreatModelError(
                    f"{name} has shape {tuple(value.shape)}, which does not fit inputs of shape "
                    f"{sample_shape}"
                )
        if self.constraints is not None:
            self.constraints.check_shape(x)
        if not bool(torch.isfinite(x).all()):
            raise ThreatModelError("inputs contain NaN or infinite values")
        lower, upper = self._bounds_like(x)
        if bool((x < lower - DEFAULT_ATOL).any()) or bool((x > upper + DEFAULT_ATOL).any()):
            lo, hi = float(x.min()), float(x.max())
            raise ThreatModelError(_outside_message(lo, hi, float(upper.max()), float(lower.min())))

    # ------------------------------------------------------------------ geometry
    def _bounds_like(self, x: Tensor) -> tuple[Tensor, Tensor]:
        lower = torch.as_tensor(self.lower, dtype=x.dtype, device=x.device)
        upper = torch.as_tensor(self.upper, dtype=x.dtype, device=x.device)
        return lower, upper

    def _mask_like(self, x: Tensor) -> Tensor | None:
        if self.mask is None:
            return None
        return self.mask.to(device=x.device, dtype=x.dtype)

    def clip_bounds(self, x: Tensor) -> Tensor:
        """Clamp inputs into the valid box."""
        lower, upper = self._bounds_like(x)
        return torch.maximum(torch.minimum(x, upper), lower)

    def apply_mask(self, delta: Tensor) -> Tensor:
        """Zero the perturbation on features that may not change."""
        mask = self._mask_like(delta)
        return delta if mask is None else delta * mask

    def project_delta(self, delta: Tensor) -> Tensor:
        """Project perturbations onto the masked ``eps``-ball (bounds not applied); a table's
        directions zero the parts that go the wrong way first (the ball's projection keeps
        every coordinate's sign, so the result still respects them)."""
        delta = self.apply_mask(delta)
        if self.constraints is not None:
            delta = self.constraints.orient(delta)
        if self.norm == "linf":
            return delta.clamp(-self.eps, self.eps)
        if self.norm == "l2":
            norms = lp_norm(delta, "l2")
            factor = (self.eps / norms.clamp_min(1e-12)).clamp(max=1.0)
            return delta * _per_sample(factor, delta)
        return project_l1_ball(delta, self.eps)

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """The point of the allowed set for clean input ``x`` that replaces ``x_adv``.

        The perturbation is masked, projected onto the ball, then clamped into the bounds;
        clamping only shrinks each coordinate of the perturbation, so the result stays in the ball.
        With table constraints the point is then repaired (:meth:`FeatureConstraints.repair`).
        """
        projected = self.clip_bounds(x + self.project_delta(x_adv - x))
        if self.constraints is None:
            return projected
        return self.constraints.repair(projected, x, self)

    def random_start(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A point drawn uniformly from the ``eps``-ball around each input, then masked and clamped.

        linf: uniform in the cube. l2 and l1: uniform in the ball, by the construction of
        Barthe, Guédon, Mendelson and Naor (2005): ``g / (||g||_p^p + z)^(1/p)`` with ``g`` drawn
        from the density proportional to ``exp(-|t|^p)`` and ``z ~ Exp(1)``.
        """
        if self.eps == 0:
            return x.clone()
        if math.isinf(self.eps):  # unbounded: uniform in the box
            lower, upper = self._bounds_like(x)
            uniform = lower + (upper - lower) * _uniform(x.shape, generator, x)
            start = self.clip_bounds(x + self.apply_mask(uniform - x))
        else:
            start = self.clip_bounds(x + self.random_delta(x, generator))
        return start if self.constraints is None else self.project(start, x)

    def random_delta(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A perturbation drawn uniformly from the (finite) ``eps``-ball, masked; bounds not
        applied."""
        if self.norm == "linf":
            delta = (_uniform(x.shape, generator, x) * 2 - 1) * self.eps
        else:
            z = -torch.log1p(-_uniform((x.shape[0],), generator, x))  # Exp(1)
            if self.norm == "l2":
                g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                g = g / math.sqrt(2.0)  # density ~ exp(-t^2)
                scale = (_flat(g).pow(2).sum(dim=1) + z).sqrt()
            else:
                u = _uniform(x.shape, generator, x) - 0.5  # Laplace(1) by inverse CDF
                g = -u.sign() * torch.log1p(-2 * u.abs())
                scale = _flat(g).abs().sum(dim=1) + z
            delta = g / _per_sample(scale, g) * self.eps
        return self.apply_mask(delta)

    def ascent_direction(
        self, grad: Tensor, point: Tensor | None = None, l1_sparsity: float = 0.99
    ) -> Tensor:
        """The steepest-ascent direction of unit norm for a gradient, on the changeable features.

        linf: ``sign(g)``; l2: ``g / ||g||_2``; l1: the sparse step of Croce & Hein (2021,
        "Mind the box"): the sign of the coordinates whose ``|g|`` is at or above the
        ``l1_sparsity`` quantile, divided by their count. Given the current ``point``, the l1 step
        leaves out the coordinates the box stops from moving along ``g`` (at the upper bound with
        ``g > 0``, at the lower with ``g < 0``): otherwise the whole step can go to a pixel the
        projection puts straight back, and the attack stalls there.
        """
        grad = self.apply_mask(grad)
        if self.norm == "l1" and point is not None:
            lower, upper = self._bounds_like(point)
            blocked = ((grad > 0) & (point >= upper)) | ((grad < 0) & (point <= lower))
            grad = grad.masked_fill(blocked, 0)
        if self.norm == "linf":
            return grad.sign()
        if self.norm == "l2":
            norms = lp_norm(grad, "l2").clamp_min(1e-12)
            return grad / _per_sample(norms, grad)
        flat = _flat(grad)
        magnitude = flat.abs()
        threshold = torch.quantile(magnitude, l1_sparsity, dim=1, keepdim=True)
        chosen = (magnitude >= threshold) & (magnitude > 0)
        count = chosen.sum(dim=1, keepdim=True).clamp_min(1)
        return (flat.sign() * chosen / count).reshape(grad.shape)

    def contains(self, x_adv: Tensor, x: Tensor, atol: float = DEFAULT_ATOL) -> Tensor:
        """Per-sample check that ``x_adv`` is an allowed perturbation of ``x`` (float slack
        ``atol``): in the ball, the box and the mask, and feasible for the table's constraints."""
        inside = self.contains_unconstrained(x_adv, x, atol)
        if self.constraints is None:
            return inside
        return inside & self.constraints.feasible(x_adv, x)

    def contains_unconstrained(
        self, x_adv: Tensor, x: Tensor, atol: float = DEFAULT_ATOL
    ) -> Tensor:
        """Per-sample check of the ball, the box and the mask only (not the table's constraints)."""
        delta = x_adv - x
        lower, upper = self._bounds_like(x)
        in_box = _flat((x_adv >= lower - atol) & (x_adv <= upper + atol)).all(dim=1)
        in_ball = lp_norm(delta, self.norm) <= self.eps + atol * max(1.0, self.eps)
        mask = self._mask_like(x)
        if mask is None:
            return in_box & in_ball
        fixed = _flat((delta * (1 - mask)).abs() <= atol).all(dim=1)
        return in_box & in_ball & fixed


def _broadcastable(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    for have, want in zip(reversed(shape), reversed(target)):
        if have not in (1, want):
            return False
    return True


def _outside_message(lo: float, hi: float, upper: float, lower: float) -> str:
    """Why inputs spanning ``[lo, hi]`` lie outside ``[lower, upper]``, naming the usual mistakes
    with [0, 1] images: 0–255 pixels, and inputs already normalised with a mean and std."""
    head = f"inputs lie outside the threat model's bounds (inputs span [{lo:.4g}, {hi:.4g}])"
    pixels = (lower, upper) == (0.0, 1.0)
    if pixels and lo >= 0 and 5 < hi <= 255:
        return (
            f"{head}: they look like 0-255 pixels; advtrain expects [0, 1], so divide by 255 "
            "(normalisation goes inside the model with --normalize or with_normalization)"
        )
    if pixels and lo < 0 and hi < 10:
        return (
            f"{head}: they look normalised with a mean and std; advtrain expects [0, 1] pixels, "
            "so leave out the normalisation transform and put it inside the model (--normalize "
            "or with_normalization)"
        )
    return f"{head}; scale the data into the bounds or pass the right lower/upper"
