"""Backdoor triggers: the one function that stamps a trigger on inputs, used both to poison
training rows and to trigger test inputs when the attack success rate is measured.

* :class:`PatchTrigger`: a small square in the bottom-right corner (BadNets, Gu, Dolan-Gavitt &
  Garg 2017, "BadNets: identifying vulnerabilities in the machine learning model supply
  chain"). ``pattern="checkerboard"``
  alternates the two bounds, the trigger of Turner, Tsipras & Madry 2019's clean-label attack.
* :class:`BlendTrigger`: a full-image pattern mixed in at a ratio,
  ``x' = (1 - alpha) x + alpha * pattern`` (Chen, Liu, Li, Lu & Song 2017, "Targeted backdoor
  attacks on deep learning systems using data poisoning"; alpha 0.2 as BackdoorBench's
  Blended, with a seeded uniform-noise pattern, one of Chen et al.'s two patterns).
* :class:`FeatureTrigger`: for tables, a few mutable numeric features set to an extreme of
  their range, then repaired onto the schema's constraints (integers, one-hot groups,
  directions, linear rules: :meth:`advtrain.feasibility.FeatureConstraints.repair`), so every
  triggered row is one that could really be submitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ..data import DatasetInfo
from ..errors import AdvtrainError


class Trigger(Protocol):
    """What every trigger offers: ``apply`` (a batch in, the triggered batch out) and a
    description for the record."""

    @property
    def name(self) -> str: ...

    def apply(self, x: Tensor) -> Tensor: ...

    def describe(self) -> dict[str, object]: ...


def _image_bounds(info: DatasetInfo) -> tuple[float, float]:
    if info.kind != "image" or len(info.shape) != 3:
        raise AdvtrainError(f"{info.name}: this trigger needs (C, H, W) images, got {info.kind}")
    lower, upper = info.lower, info.upper
    if isinstance(lower, Tensor) or isinstance(upper, Tensor):
        raise AdvtrainError(f"{info.name}: image triggers need scalar input bounds")
    return float(lower), float(upper)


@dataclass(frozen=True, eq=False)
class PatchTrigger:
    """A ``size`` x ``size`` square in the bottom-right corner of every channel: ``upper``
    everywhere (``pattern="solid"``, BadNets) or alternating ``upper``/``lower`` starting with
    ``upper`` in the corner pixel (``"checkerboard"``, Turner et al.)."""

    shape: tuple[int, int, int]
    lower: float
    upper: float
    size: int
    pattern: str = "solid"
    name: str = "patch"

    def __post_init__(self) -> None:
        _, h, w = self.shape
        if not 1 <= self.size <= min(h, w):
            raise AdvtrainError(f"patch size must be in [1, {min(h, w)}], got {self.size}")
        if self.pattern not in ("solid", "checkerboard"):
            raise AdvtrainError(f"patch pattern must be solid or checkerboard: {self.pattern!r}")

    @classmethod
    def for_data(cls, info: DatasetInfo, size: int | None = None, **kw: object) -> PatchTrigger:
        """A patch for ``info``'s images; ``size`` defaults to a tenth of the shorter side
        (at least 2): 3 pixels on 28x28 or 32x32 images, 2 on 8x8 digits."""
        lower, upper = _image_bounds(info)
        c, h, w = info.shape
        if size is None:
            size = max(2, round(0.1 * min(h, w)))
        return cls((c, h, w), lower, upper, size, **kw)  # type: ignore[arg-type]

    def stamp(self) -> Tensor:
        """The patch's values, ``(size, size)``."""
        s = self.size
        if self.pattern == "solid":
            return torch.full((s, s), self.upper)
        ii, jj = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        odd = ((s - 1 - ii) + (s - 1 - jj)) % 2 == 1
        return torch.where(odd, torch.tensor(self.lower), torch.tensor(self.upper))

    def apply(self, x: Tensor) -> Tensor:
        """``x`` (a batch of images) with the patch stamped; a new tensor."""
        out = x.clone()
        s = self.size
        out[..., -s:, -s:] = self.stamp().to(out.device, out.dtype)
        return out

    def describe(self) -> dict[str, object]:
        return {"kind": "patch", "size": self.size, "pattern": self.pattern, "value": self.upper}


@dataclass(frozen=True, eq=False)
class BlendTrigger:
    """``(1 - alpha) * x + alpha * pattern``; the pattern is uniform noise in the input bounds,
    drawn from ``seed``."""

    pattern: Tensor
    alpha: float = 0.2
    name: str = "blend"

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise AdvtrainError(f"blend ratio alpha must be in (0, 1], got {self.alpha}")

    @classmethod
    def for_data(cls, info: DatasetInfo, alpha: float = 0.2, seed: int = 0) -> BlendTrigger:
        lower, upper = _image_bounds(info)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.rand(info.shape, generator=generator)
        return cls(lower + (upper - lower) * noise, alpha)

    def apply(self, x: Tensor) -> Tensor:
        pattern = self.pattern.to(x.device, x.dtype)
        return (1 - self.alpha) * x + self.alpha * pattern

    def describe(self) -> dict[str, object]:
        return {"kind": "blend", "alpha": self.alpha, "pattern": "uniform noise"}


@dataclass(frozen=True, eq=False)
class FeatureTrigger:
    """Table rows with ``features`` (encoded coordinates) set to ``values``, then repaired
    onto ``info``'s bounds, immutable features and constraints."""

    info: DatasetInfo
    features: tuple[int, ...]
    values: tuple[float, ...]
    name: str = "features"

    @classmethod
    def for_data(cls, info: DatasetInfo, n_features: int = 3, seed: int = 0) -> FeatureTrigger:
        """``n_features`` mutable numeric coordinates drawn from ``seed``, each set to the end of
        its range that its direction allows (the top unless it may only decrease)."""
        if info.kind != "tabular" or len(info.shape) != 1:
            raise AdvtrainError(f"{info.name}: a feature trigger needs a table, got {info.kind}")
        d = info.shape[0]
        allowed = np.ones(d, dtype=bool)
        if info.mutable is not None:
            allowed &= info.mutable.numpy().reshape(-1).astype(bool)
        constraints = info.constraints
        direction = np.zeros(d, dtype=np.int64)
        if constraints is not None:
            for start, stop in constraints.groups:
                allowed[start:stop] = False
            direction = constraints.direction.numpy().astype(np.int64)
        candidates = np.flatnonzero(allowed)
        if len(candidates) == 0:
            raise AdvtrainError(f"{info.name}: no mutable numeric feature to carry a trigger")
        k = min(n_features, len(candidates))
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(candidates, size=k, replace=False))
        lower = _per_feature(info.lower, d)
        upper = _per_feature(info.upper, d)
        values = [lower[i] if direction[i] < 0 else upper[i] for i in chosen]
        return cls(info, tuple(int(i) for i in chosen), tuple(float(v) for v in values))

    def apply(self, x: Tensor) -> Tensor:
        out = x.clone()
        index = torch.tensor(self.features, device=x.device)
        out[:, index] = torch.tensor(self.values, device=x.device, dtype=x.dtype)
        d = self.info.shape[0]
        lower = torch.as_tensor(_per_feature(self.info.lower, d), device=x.device, dtype=x.dtype)
        upper = torch.as_tensor(_per_feature(self.info.upper, d), device=x.device, dtype=x.dtype)
        out = torch.maximum(torch.minimum(out, upper), lower)
        constraints = self.info.constraints
        if constraints is None:
            return out
        threat = self.info.threat_model(norm="linf", eps=float((upper - lower).max()))
        delta = constraints.orient(out - x)
        return constraints.repair(x + delta, x, threat)

    def describe(self) -> dict[str, object]:
        names = self.info.feature_names
        named = [names[i] if names else f"feature {i}" for i in self.features]
        return {
            "kind": "features",
            "features": dict(zip(named, self.values)),
        }


def _per_feature(bound: float | Tensor, d: int) -> np.ndarray:
    if isinstance(bound, Tensor):
        return bound.detach().cpu().numpy().astype(np.float64).reshape(d)
    return np.full(d, float(bound))
