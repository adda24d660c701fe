"""scikit-learn's digits and breast cancer sets, and the builder shared by tabular sets."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits

from .base import Dataset, DatasetInfo, LoadRequest, make_split
from .splits import minmax_apply, minmax_fit, three_way

#: Default linf radius for ``digits`` (pixels in [0, 1], 17 grey levels).
DIGITS_EPS = 0.2
#: Default linf radius for ``breast-cancer`` (features min-max scaled to [0, 1]).
BREAST_CANCER_EPS = 0.05


def tabular_dataset(
    x: np.ndarray,
    y: np.ndarray,
    request: LoadRequest,
    *,
    name: str,
    classes: tuple[str, ...],
    feature_names: tuple[str, ...],
    default_eps: float,
    positive_class: int | None,
    mutable: np.ndarray | None = None,
) -> Dataset:
    """Split rows stratified, min-max scale with the training split's range, describe the result.

    Validation and test rows are clipped into [0, 1], so the test set never leaks into the scaling.
    """
    train, val, test = three_way(y, request.val_fraction, request.test_fraction, request.seed)
    offset, scale = minmax_fit(x[train])
    n_features = x.shape[1]
    info = DatasetInfo(
        name=name,
        kind="tabular",
        classes=classes,
        shape=(n_features,),
        lower=torch.zeros(n_features, dtype=torch.float32),
        upper=torch.ones(n_features, dtype=torch.float32),
        mutable=None if mutable is None else torch.as_tensor(mutable, dtype=torch.bool),
        default_eps=default_eps,
        positive_class=positive_class,
        feature_names=feature_names,
    )
    return Dataset(
        info=info,
        train=make_split(minmax_apply(x[train], offset, scale), y[train]),
        val=make_split(minmax_apply(x[val], offset, scale), y[val]),
        test=make_split(minmax_apply(x[test], offset, scale), y[test]),
    )


def load_digits_dataset(request: LoadRequest) -> Dataset:
    """scikit-learn's 1,797 8x8 digit images, scaled from 0..16 to [0, 1], shape (1, 8, 8)."""
    bunch = load_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    train, val, test = three_way(y, request.val_fraction, request.test_fraction, request.seed)
    info = DatasetInfo(
        name="digits",
        kind="image",
        classes=tuple(str(c) for c in bunch.target_names),
        shape=(1, 8, 8),
        lower=0.0,
        upper=1.0,
        mutable=None,
        default_eps=DIGITS_EPS,
        positive_class=None,
    )
    return Dataset(
        info=info,
        train=make_split(x[train], y[train]),
        val=make_split(x[val], y[val]),
        test=make_split(x[test], y[test]),
    )


def load_breast_cancer_dataset(request: LoadRequest) -> Dataset:
    """scikit-learn's Wisconsin breast cancer set: 569 rows, 30 features; malignant is class 0."""
    bunch = load_breast_cancer()
    return tabular_dataset(
        bunch.data.astype(np.float64),
        bunch.target.astype(np.int64),
        request,
        name="breast-cancer",
        classes=tuple(str(c) for c in bunch.target_names),
        feature_names=tuple(str(f) for f in bunch.feature_names),
        default_eps=BREAST_CANCER_EPS,
        positive_class=0,
    )
