"""Datasets for adversarial training: MNIST, scikit-learn's digits and breast cancer, and fraud.

``load_dataset(name)`` returns a :class:`Dataset`: a :class:`DatasetInfo` (classes, sample shape,
input bounds, which features may change, a default ``eps``) and stratified, seeded
train/val/test :class:`Split` s of float32 inputs inside the bounds and int64 labels.
"""

from .base import Dataset, DatasetInfo, Split
from .mnist import download_mnist
from .registry import DATASETS, load_dataset

__all__ = ["DATASETS", "Dataset", "DatasetInfo", "Split", "download_mnist", "load_dataset"]
