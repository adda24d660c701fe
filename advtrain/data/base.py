"""What every dataset loader returns: :class:`DatasetInfo`, :class:`Split` and :class:`Dataset`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..threat import Norm, ThreatModel
from .lazy import Inputs

if TYPE_CHECKING:
    import pandas as pd

    from ..feasibility import FeatureConstraints
    from .table_encoding import TableEncoding

Bound = float | Tensor


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """What a model and a threat model need to know about a dataset.

    ``lower``/``upper`` are scalars for images and per-feature float32 tensors of shape ``shape``
    for tabular data; ``mutable`` is a bool tensor of shape ``shape``, True where a feature may be
    changed by an adversary (None: all may change). A table read with
    :func:`advtrain.data.load_table` also carries its fitted ``encoding`` and the
    ``constraints`` every attack must honour (both None for every other dataset).
    """

    name: str
    kind: Literal["image", "tabular"]
    classes: tuple[str, ...]
    shape: tuple[int, ...]
    lower: Bound
    upper: Bound
    mutable: Tensor | None
    default_eps: float
    positive_class: int | None
    feature_names: tuple[str, ...] | None = None
    encoding: TableEncoding | None = None
    constraints: FeatureConstraints | None = None

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def threat_model(self, norm: str = "linf", eps: float | None = None) -> ThreatModel:
        """A threat model with these bounds, mask and constraints; ``eps`` defaults to
        ``default_eps``."""

        def copy(value: Bound) -> Bound:
            return value.clone() if isinstance(value, Tensor) else value

        return ThreatModel(
            norm=cast("Norm", norm),  # a str from the user: ThreatModel refuses unknown names
            eps=self.default_eps if eps is None else eps,
            lower=copy(self.lower),
            upper=copy(self.upper),
            mask=None if self.mutable is None else self.mutable.clone(),
            constraints=self.constraints,
        )


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset: float32 inputs ``x`` inside the bounds and int64 labels ``y``.

    ``x`` is a tensor held whole, or for image folders a :class:`~advtrain.data.lazy.LazyInputs`
    whose files are read when indexed (``x[index]`` is a tensor either way). ``rows`` (tables
    read from a file only) holds each row's position among the file's data rows.
    """

    x: Inputs
    y: Tensor
    rows: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(f"split has {self.x.shape[0]} inputs but {self.y.shape[0]} labels")
        if self.rows is not None and len(self.rows) != self.x.shape[0]:
            raise DataError(f"split has {self.x.shape[0]} inputs but {len(self.rows)} row numbers")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return (
            f"Split(n={len(self)}, x={self.x.dtype}{list(self.x.shape)}, "
            f"y={self.y.dtype}{list(self.y.shape)})"
        )


@dataclass(frozen=True, eq=False)
class RawTable:
    """A table as read: every cell's original text, for writing rows back in the user's terms.

    ``text`` holds all columns (label included) in file order as strings, its column names as
    written; ``line_terminator`` is the file's (a newline, or carriage return and newline).
    """

    text: pd.DataFrame
    encoding: TableEncoding
    path: Path | None = None
    line_terminator: str = "\n"


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset's description and its train, validation and test splits.

    ``table`` is the raw table (tables read with :func:`advtrain.data.load_table` only).
    """

    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    table: RawTable | None = None


@dataclass(frozen=True)
class LoadRequest:
    """The options of :func:`advtrain.data.load_dataset`, passed on to each loader."""

    data_dir: str | Path | None = None
    download: bool = True
    mirror: str | None = None
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2


def make_split(x: np.ndarray, y: np.ndarray, rows: np.ndarray | None = None) -> Split:
    """A :class:`Split` from numpy arrays, as contiguous float32 inputs and int64 labels.

    Read-only arrays (such as cached ones) are copied so the tensors never alias them.
    """
    if not x.flags.writeable:
        x = x.copy()
    if not y.flags.writeable:
        y = y.copy()
    xt = torch.as_tensor(x).to(torch.float32).contiguous()
    yt = torch.as_tensor(y).to(torch.int64).contiguous()
    return Split(xt, yt, None if rows is None else np.asarray(rows, dtype=np.int64))
