"""Certified accuracy of a smoothed classifier against the l2 radius: figures, a table, a curve.

The certified accuracy at radius ``r`` (Cohen, Rosenfeld & Kolter 2019, section 4) is the share
of points whose smoothed prediction is correct and certified with radius at least ``r``: at
``r = 0`` every correct, non-abstained point counts. It is a lower bound on the smoothed
classifier's robust accuracy at ``r`` (each certificate holding with probability at least
``1 - alpha``), not a statement about the base model.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import AdvtrainError
from ..util import atomic_write_bytes
from .smoothing import Certificate

__all__ = ["CertifiedAccuracy", "certified_accuracy", "write_certified_accuracy_curve"]

#: Radii of the usual tables (the literature's tables step by 0.25 from 0).
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class CertifiedAccuracy:
    """Certified accuracy at each radius of ``radii`` over ``n_points`` points, for noise
    level ``sigma``; ``abstained`` is the share of points the smoothed classifier abstained
    on."""

    radii: tuple[float, ...]
    accuracy: tuple[float, ...]
    n_points: int
    sigma: float
    abstained: float

    def rows(self) -> list[dict[str, float]]:
        """One ``{"radius": r, "accuracy": a}`` per radius."""
        return [{"radius": r, "accuracy": a} for r, a in zip(self.radii, self.accuracy)]

    def table(self) -> str:
        """A plain-text table, one row per radius: the l2 radius and the certified accuracy."""
        lines = [
            f"certified accuracy of the smoothed classifier (sigma={self.sigma:g}, "
            f"{self.n_points} points, {self.abstained:.1%} abstained)",
            f"{'l2 radius':>10}  {'accuracy':>8}",
        ]
        lines += [f"{r:>10.2f}  {a:>8.2%}" for r, a in zip(self.radii, self.accuracy)]
        return "\n".join(lines)


def _labels(certificate: Certificate, y: Tensor | Sequence[int] | np.ndarray) -> Tensor:
    if not isinstance(certificate, Certificate):
        raise AdvtrainError(
            f"certified_accuracy needs a Certificate (Smoothed.certify), got "
            f"{type(certificate).__name__}"
        )
    labels = torch.as_tensor(y).detach().cpu().reshape(-1)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise AdvtrainError(f"y must hold integer class labels, got {labels.dtype}")
    if labels.shape[0] != len(certificate):
        raise AdvtrainError(
            f"y has {labels.shape[0]} labels for {len(certificate)} certified points"
        )
    return labels.long()


def _certified_radii(certificate: Certificate, labels: Tensor) -> Tensor:
    """Each point's certified radius where it is correct and certified, -inf elsewhere."""
    correct = (certificate.prediction == labels) & ~certificate.abstained
    return torch.where(correct, certificate.radius, torch.full_like(certificate.radius, -np.inf))


def certified_accuracy(
    certificate: Certificate,
    y: Tensor | Sequence[int] | np.ndarray,
    radii: Sequence[float] = DEFAULT_RADII,
) -> CertifiedAccuracy:
    """The share of the certified points that are correct with radius ``>= r``, for each ``r``
    of ``radii`` (finite, ``>= 0``); ``y`` holds the true labels."""
    labels = _labels(certificate, y)
    values = tuple(float(r) for r in radii)
    if not values or any(not np.isfinite(r) or r < 0 for r in values):
        raise AdvtrainError(f"radii must be finite numbers >= 0, got {list(radii)!r}")
    reach = _certified_radii(certificate, labels)
    n = len(certificate)
    accuracy = tuple(float((reach >= r).sum()) / n for r in values)
    return CertifiedAccuracy(
        radii=values,
        accuracy=accuracy,
        n_points=n,
        sigma=certificate.settings.sigma,
        abstained=float(certificate.abstained.float().mean()),
    )


def write_certified_accuracy_curve(
    curves: Mapping[str, tuple[Certificate, Tensor | Sequence[int] | np.ndarray]],
    path: str | Path,
    *,
    title: str = "randomized smoothing: certified accuracy",
) -> Path:
    """Draw certified accuracy against the l2 radius for each labelled ``(certificate, y)`` of
    ``curves`` into a PNG at ``path`` (written atomically), as the paper's figures do: a step
    curve from radius 0 to the largest certified radius. Drawn with matplotlib's Agg canvas (no
    pyplot state)."""
    if not curves:
        raise AdvtrainError("nothing to draw: no certificates")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 4.0))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for label, (certificate, y) in curves.items():
        reach = _certified_radii(certificate, _labels(certificate, y)).numpy()
        top = float(reach.max()) if np.isfinite(reach).any() else 0.0
        grid = np.linspace(0.0, max(top, 1e-6) * 1.05, 400)
        share = (reach[None, :] >= grid[:, None]).mean(axis=1)
        sigma = certificate.settings.sigma
        ax.plot(grid, share, label=f"{label} (sigma={sigma:g})", drawstyle="steps-post")
    ax.set_xlabel("l2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlim(left=0.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(title, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
