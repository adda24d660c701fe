"""The dataset registry and :func:`load_dataset`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import unknown
from .base import Dataset, LoadRequest
from .fraud import load_fraud_dataset
from .mnist import load_mnist_dataset
from .splits import check_fractions
from .tabular import load_breast_cancer_dataset, load_digits_dataset
from .transactions import load_transactions_dataset

Loader = Callable[[LoadRequest], Dataset]

LOADERS: dict[str, Loader] = {
    "mnist": load_mnist_dataset,
    "digits": load_digits_dataset,
    "breast-cancer": load_breast_cancer_dataset,
    "fraud": load_fraud_dataset,
    "transactions": load_transactions_dataset,
}
DATASETS: tuple[str, ...] = tuple(LOADERS)


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = True,
    mirror: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Dataset:
    """Load a dataset by name, split into stratified train/val/test parts.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: where MNIST's files are (default ``$ADVTRAIN_DATA``, else ``~/.cache/advtrain``).
        download: fetch missing MNIST files from ``mirror``.
        mirror: base URL for MNIST (default ``$ADVTRAIN_MNIST_MIRROR``, else a public mirror).
        seed: seed of the splits; the same seed gives the same splits.
        val_fraction: share of the rows in ``val`` (for MNIST: of the official training set).
        test_fraction: share of all rows in ``test`` (ignored by MNIST, which has its own).

    Raises:
        UnknownNameError: ``name`` is not a known dataset.
        AdvtrainError: the fractions are not positive or add up to 1 or more.
        DataError: MNIST files are missing, corrupt or cannot be downloaded.
    """
    try:
        loader = LOADERS[name]
    except (KeyError, TypeError):
        raise unknown("dataset", name, DATASETS) from None
    check_fractions(val_fraction, test_fraction)
    request = LoadRequest(
        data_dir=data_dir,
        download=download,
        mirror=mirror,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
    return loader(request)
