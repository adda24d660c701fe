"""Seeded stratified splits and train-split min-max scaling."""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
from sklearn.model_selection import train_test_split

from ..errors import AdvtrainError


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Require both fractions > 0 and ``val_fraction + test_fraction < 1``."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise AdvtrainError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(float(value)) or value <= 0:
            raise AdvtrainError(f"{name} must be > 0, got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise AdvtrainError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
        )


def holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(kept, held_out)`` with ``fraction`` of the rows held out, stratified by ``y``."""
    kept, held = train_test_split(
        np.arange(len(y)), test_size=fraction, stratify=y, random_state=seed
    )
    return kept, held


def three_way(
    y: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified ``(train, val, test)`` indices; the fractions are of all rows."""
    rest, test = holdout(y, test_fraction, seed)
    train_pos, val_pos = holdout(y[rest], val_fraction / (1.0 - test_fraction), seed)
    return rest[train_pos], rest[val_pos], test


def minmax_fit(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature ``(offset, scale)`` mapping the training rows onto [0, 1].

    Constant features get scale 1, so they map to 0 instead of dividing by zero.
    """
    low = x_train.min(axis=0)
    span = x_train.max(axis=0) - low
    span = np.where(span > 0, span, 1.0)
    return low, span


def minmax_apply(x: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Scale with a fitted ``(offset, scale)``, clip into [0, 1] (for unseen rows), as float32."""
    return np.clip((x - offset) / scale, 0.0, 1.0).astype(np.float32)
