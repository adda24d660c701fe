"""Datasets for adversarial training: MNIST, scikit-learn's digits and breast cancer, fraud,
the generated card transactions, and a user's own table (:func:`load_table`).

``load_dataset(name)`` returns a :class:`Dataset`: a :class:`DatasetInfo` (classes, sample shape,
input bounds, which features may change, a default ``eps``) and stratified, seeded
train/val/test :class:`Split` s of float32 inputs inside the bounds and int64 labels.
``load_table(path, schema)`` does the same for a CSV or Parquet file described by a TOML schema,
``load_images(path)`` for a folder of class folders, an ``.npz`` file or CIFAR's files, whose
inputs are :class:`LazyInputs` read on demand.
"""

from .base import Dataset, DatasetInfo, RawTable, Split
from .images import load_images
from .lazy import Inputs, LazyInputs
from .mnist import download_mnist
from .registry import DATASETS, load_dataset
from .schema import ColumnSpec, LinearRule, TableSchema, parse_schema
from .table import load_table
from .table_encoding import TABLE_ENCODING_FILE, TableEncoding
from .table_output import write_adversarial_csv

__all__ = [
    "DATASETS",
    "TABLE_ENCODING_FILE",
    "ColumnSpec",
    "Dataset",
    "DatasetInfo",
    "Inputs",
    "LazyInputs",
    "LinearRule",
    "RawTable",
    "Split",
    "TableEncoding",
    "TableSchema",
    "download_mnist",
    "load_dataset",
    "load_images",
    "load_table",
    "parse_schema",
    "write_adversarial_csv",
]
