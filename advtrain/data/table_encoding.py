"""The encoding of a table's rows into the flat float32 vectors a model and an attack see.

:class:`TableEncoding` is fitted on the TRAINING split only (:meth:`TableEncoding.fit`):

* feature columns keep the file's order (the label column is left out); a column the schema
  does not name is continuous, mutable and bounded by the training split;
* continuous and integer columns are min-max scaled into [0, 1] by the schema's ``min``/``max``,
  else the training split's (a constant column gets scale 1), and clipped into [0, 1] as
  :func:`advtrain.data.splits.minmax_apply` does, so rows outside the fitted range stay in bounds;
* binary columns are 0/1 (``true``/``false`` accepted), categorical columns one-hot over the
  training split's categories sorted as text;
* labels: the sorted unique label values become classes ``0..K-1`` (sorted as numbers when every
  value is a number, else as text); :attr:`TableEncoding.classes` names them as text.

Every coordinate maps back to raw units by ``raw = offset + scale * z`` (one-hot coordinates:
offset 0, scale 1), so an ``eps`` measured in ``z`` counts every coordinate, and a category switch
costs 1 in linf (as in TabularBench, where distances are taken after the scaler).
:meth:`TableEncoding.feature_constraints` hands that map, the integer columns, one-hot groups,
directions and linear rules to :class:`advtrain.feasibility.FeatureConstraints`.

:meth:`TableEncoding.to_json` / :meth:`TableEncoding.from_json` keep it as a plain JSON-safe dict
(no pickle), so a run directory can encode a raw table again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..errors import DataError
from ..feasibility import FeatureConstraints
from .schema import COLUMN_TYPES, DIRECTIONS, LinearRule, TableSchema

#: Identifies the dict of :meth:`TableEncoding.to_json`.
ENCODING_FORMAT = "advtrain-table-encoding"
#: The file of a run directory that keeps a table's fitted encoding (the preprocessing in front
#: of the model), so the run reads raw rows again.
TABLE_ENCODING_FILE = "table_encoding.json"
ENCODING_VERSION = 1
_DIRECTION_SIGN = {"any": 0, "increase": 1, "decrease": -1}
_TRUE_FALSE = {"true": "1", "false": "0"}


@dataclass(frozen=True)
class EncodedColumn:
    """One feature column: ``raw = offset + scale * z`` (categorical: one coordinate per
    category, offset 0, scale 1)."""

    name: str
    type: str
    offset: float = 0.0
    scale: float = 1.0
    categories: tuple[str, ...] = ()
    mutable: bool = True
    direction: str = "any"

    @property
    def width(self) -> int:
        """Number of coordinates of the column in an encoded row."""
        return len(self.categories) if self.type == "categorical" else 1


# ---------------------------------------------------------------------- cell conversion


def _missing(series: pd.Series, name: str, text: np.ndarray | None = None) -> None:
    """Refuse a column with an empty or NaN cell, naming the column and the first such row."""
    missing = series.isna().to_numpy()
    if text is not None:
        missing = missing | (np.char.strip(text.astype(str)) == "")
    if missing.any():
        row = int(np.flatnonzero(missing)[0]) + 1
        raise DataError(f"column {name!r} has a missing value (row {row})")


def _is_text(series: pd.Series) -> bool:
    return not (pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series))


def numeric_values(series: pd.Series, name: str, kind: str) -> np.ndarray:
    """A numeric column's raw values, float64; integers must be whole, binary values 0/1.

    Raises:
        DataError: naming the column and the first missing, non-numeric, non-finite,
            non-integer or non-0/1 value.
    """
    if _is_text(series):
        text = series.to_numpy(dtype=object)
        _missing(series, name, text)
        cleaned = pd.Series([str(cell).strip() for cell in text], dtype=object)
        if kind == "binary":
            cleaned = cleaned.map(lambda cell: _TRUE_FALSE.get(cell.lower(), cell))
        values = pd.to_numeric(cleaned, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.isnan(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"column {name!r} ({kind}) has a value that is not a number: "
                f"{text[row]!r} (row {row + 1}); declare it categorical in the schema"
            )
    else:
        _missing(series, name)
        values = series.to_numpy(dtype=np.float64)
    checks = (
        (~np.isfinite(values), "a value that is not finite"),
        (
            (values != np.round(values)) if kind == "integer" else np.zeros(len(values), bool),
            "a value that is not an integer",
        ),
        (
            ~np.isin(values, (0.0, 1.0)) if kind == "binary" else np.zeros(len(values), bool),
            "a value that is not 0/1 (or true/false)",
        ),
    )
    for bad, what in checks:
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raw = series.iloc[row]
            raise DataError(f"column {name!r} ({kind}) has {what}: {raw!r} (row {row + 1})")
    return values


def category_values(series: pd.Series, name: str) -> np.ndarray:
    """A categorical column's values as text (numbers as pandas writes them), object array."""
    _missing(series, name, series.to_numpy(dtype=object) if _is_text(series) else None)
    return np.array([str(cell) for cell in series.to_numpy(dtype=object)], dtype=object)


def label_text(value: object) -> str:
    """The canonical text of a label value: ``1``, ``1.0``, ``"1"`` and ``" 1 "`` are all
    ``"1"``; ``True``/``"TRUE"`` are ``"true"``; other text is kept (stripped)."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        number = float(value)
        if math.isfinite(number) and number == round(number) and abs(number) < 2**53:
            return str(int(number))
        return repr(number)
    text = str(value).strip()
    if text.lower() in ("true", "false"):
        return text.lower()
    try:
        number = float(text)
    except ValueError:
        return text
    return label_text(number) if math.isfinite(number) else text


def label_texts(series: pd.Series, name: str) -> np.ndarray:
    """The canonical text (:func:`label_text`) of every label cell, object array."""
    _missing(series, name, series.to_numpy(dtype=object) if _is_text(series) else None)
    codes, uniques = pd.factorize(series, use_na_sentinel=False)
    canonical = np.array([label_text(u) for u in uniques], dtype=object)
    return canonical[codes]


def sorted_classes(values: Sequence[str]) -> tuple[str, ...]:
    """The unique label texts sorted as numbers when all are numbers, else as text."""
    unique = sorted(set(values))
    try:
        return tuple(sorted(unique, key=float))
    except ValueError:
        return tuple(unique)


def _as_numpy(z: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(z, Tensor):
        return z.detach().cpu().to(torch.float64).numpy()
    return np.asarray(z, dtype=np.float64)


# ---------------------------------------------------------------------- the encoding


@dataclass(frozen=True, eq=False)
class TableEncoding:
    """A fitted encoding of a table's feature columns and labels (see the module docstring).

    Build it with :meth:`fit` or :meth:`from_json`. ``positive`` is the positive class's text:
    the schema's ``label.positive``, else for two classes the training split's minority class
    (the second on a tie), else None.
    """

    label: str
    classes: tuple[str, ...]
    columns: tuple[EncodedColumn, ...]
    rules: tuple[LinearRule, ...] = ()
    positive: str | None = None

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, frame: pd.DataFrame, schema: TableSchema) -> TableEncoding:
        """Fit on the training rows ``frame`` (text cells as read, or typed values).

        Raises:
            DataError: a schema or rule column the table lacks, a missing label column, a bad
                cell, fewer than 2 classes, a positive label that is not a class.
        """
        schema.check_columns(frame.columns)
        if len(frame) == 0:
            raise DataError("cannot fit a table encoding on zero rows")
        columns = []
        for name in frame.columns:
            if name == schema.label:
                continue
            spec = schema.column(name)
            if spec.type == "categorical":
                categories = tuple(sorted(set(category_values(frame[name], name))))
                columns.append(
                    EncodedColumn(name, "categorical", categories=categories, mutable=spec.mutable)
                )
                continue
            offset, scale = 0.0, 1.0
            if spec.type != "binary":
                values = numeric_values(frame[name], name, spec.type)
                low = float(values.min()) if spec.min is None else spec.min
                high = float(values.max()) if spec.max is None else spec.max
                offset, scale = low, (high - low if high > low else 1.0)
            else:
                numeric_values(frame[name], name, spec.type)
            columns.append(
                EncodedColumn(name, spec.type, offset, scale, (), spec.mutable, spec.direction)
            )
        if not columns:
            raise DataError(f"the table has no feature columns besides the label {schema.label!r}")
        labels = label_texts(frame[schema.label], schema.label)
        classes = sorted_classes(list(labels))
        if len(classes) < 2:
            raise DataError(
                f"label column {schema.label!r} has {len(classes)} class(es) "
                f"({', '.join(classes)}); at least 2 are needed"
            )
        positive = None
        if schema.positive is not None:
            positive = label_text(schema.positive)
            if positive not in classes:
                raise DataError(
                    f"label.positive {schema.positive!r} is not a value of column "
                    f"{schema.label!r} (values: {', '.join(classes)})"
                )
        elif len(classes) == 2:
            counts = [int((labels == value).sum()) for value in classes]
            positive = classes[0] if counts[0] < counts[1] else classes[1]
        return cls(schema.label, classes, tuple(columns), schema.rules, positive)

    # ------------------------------------------------------------------ per-coordinate views
    @property
    def n_features(self) -> int:
        """Width ``d`` of an encoded row."""
        return sum(column.width for column in self.columns)

    @property
    def feature_columns(self) -> tuple[str, ...]:
        """The feature columns' names, in file order."""
        return tuple(column.name for column in self.columns)

    @property
    def starts(self) -> tuple[int, ...]:
        """The first coordinate of each column."""
        starts, position = [], 0
        for column in self.columns:
            starts.append(position)
            position += column.width
        return tuple(starts)

    @property
    def names(self) -> tuple[str, ...]:
        """One name per coordinate: the column's, or ``"channel=web"`` for a one-hot one."""
        names: list[str] = []
        for column in self.columns:
            if column.type == "categorical":
                names.extend(f"{column.name}={category}" for category in column.categories)
            else:
                names.append(column.name)
        return tuple(names)

    def _per_coordinate(self, value: Any, one_hot: Any, dtype: Any) -> np.ndarray:
        out = []
        for column in self.columns:
            if column.type == "categorical":
                out.extend([one_hot(column)] * column.width)
            else:
                out.append(value(column))
        return np.array(out, dtype=dtype)

    @property
    def offset(self) -> np.ndarray:
        """float64 ``(d,)``: raw value at ``z = 0``."""
        return self._per_coordinate(lambda c: c.offset, lambda c: 0.0, np.float64)

    @property
    def scale(self) -> np.ndarray:
        """float64 ``(d,)``: raw units per unit of ``z`` (> 0)."""
        return self._per_coordinate(lambda c: c.scale, lambda c: 1.0, np.float64)

    @property
    def integer(self) -> np.ndarray:
        """bool ``(d,)``: integer and binary columns (one-hot coordinates are groups instead)."""
        whole = ("integer", "binary")
        return self._per_coordinate(lambda c: c.type in whole, lambda c: False, bool)

    @property
    def mutable(self) -> np.ndarray:
        """bool ``(d,)``: True where the attacker may change the coordinate."""
        return self._per_coordinate(lambda c: c.mutable, lambda c: c.mutable, bool)

    @property
    def direction(self) -> np.ndarray:
        """int8 ``(d,)``: ``+1`` may only increase, ``-1`` only decrease, ``0`` either way."""
        sign = _DIRECTION_SIGN
        return self._per_coordinate(lambda c: sign[c.direction], lambda c: 0, np.int8)

    @property
    def lower(self) -> np.ndarray:
        """float32 zeros ``(d,)``: the smallest encoded value of each coordinate."""
        return np.zeros(self.n_features, dtype=np.float32)

    @property
    def upper(self) -> np.ndarray:
        """float32 ones ``(d,)``: the largest encoded value of each coordinate."""
        return np.ones(self.n_features, dtype=np.float32)

    @property
    def groups(self) -> tuple[tuple[int, int], ...]:
        """One ``(start, stop)`` coordinate range per categorical column."""
        return tuple(
            (start, start + column.width)
            for start, column in zip(self.starts, self.columns, strict=True)
            if column.type == "categorical"
        )

    @property
    def positive_class(self) -> int | None:
        """Index of the positive class (see the class docstring), or None."""
        return None if self.positive is None else self.classes.index(self.positive)

    def rule_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """The rules as float64 ``(r, d)`` coefficients and ``(r,)`` bounds in raw units."""
        index = dict(zip(self.feature_columns, self.starts, strict=True))
        coefficients = np.zeros((len(self.rules), self.n_features), dtype=np.float64)
        for i, rule in enumerate(self.rules):
            for name, value in rule.coefficients.items():
                coefficients[i, index[name]] += value
        bounds = np.array([rule.bound for rule in self.rules], dtype=np.float64)
        return coefficients, bounds

    def feature_constraints(self) -> FeatureConstraints:
        """The integer columns, one-hot groups, directions and rules for the threat model."""
        coefficients, bounds = self.rule_matrix()
        return FeatureConstraints(
            offset=torch.as_tensor(self.offset),
            scale=torch.as_tensor(self.scale),
            integer=torch.as_tensor(self.integer),
            direction=torch.as_tensor(self.direction),
            groups=self.groups,
            rule_coefficients=torch.as_tensor(coefficients),
            rule_bounds=torch.as_tensor(bounds),
            rules=tuple(rule.text for rule in self.rules),
            names=self.names,
        )

    # ------------------------------------------------------------------ encoding
    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """float32 ``(n, d)`` encoded rows of ``frame`` (which may hold other columns too).

        Raises:
            DataError: a feature column is missing, or a cell is missing, malformed, or a
                category never seen in training.
        """
        missing = [name for name in self.feature_columns if name not in frame.columns]
        if missing:
            raise DataError(f"the table lacks feature columns: {', '.join(map(repr, missing))}")
        z = np.zeros((len(frame), self.n_features), dtype=np.float64)
        for start, column in zip(self.starts, self.columns, strict=True):
            if column.type == "categorical":
                values = category_values(frame[column.name], column.name)
                codes = pd.Index(list(column.categories)).get_indexer(values)
                unseen = codes < 0
                if unseen.any():
                    value = values[int(np.flatnonzero(unseen)[0])]
                    raise DataError(
                        f"column {column.name!r} has category {value!r} never seen in training "
                        f"(known: {', '.join(column.categories)})"
                    )
                z[np.arange(len(frame)), start + codes] = 1.0
            else:
                values = numeric_values(frame[column.name], column.name, column.type)
                z[:, start] = np.clip((values - column.offset) / column.scale, 0.0, 1.0)
        return z.astype(np.float32)

    def encode_labels(self, frame: pd.DataFrame) -> np.ndarray:
        """int64 ``(n,)`` class indices of the label column.

        Raises:
            DataError: the label column is missing, or holds a value that is not a class.
        """
        if self.label not in frame.columns:
            raise DataError(f"the table has no label column {self.label!r}")
        texts = label_texts(frame[self.label], self.label)
        index = {name: i for i, name in enumerate(self.classes)}
        codes = np.array([index.get(text, -1) for text in texts], dtype=np.int64)
        if (codes < 0).any():
            value = texts[int(np.flatnonzero(codes < 0)[0])]
            raise DataError(
                f"label column {self.label!r} has value {value!r} that is not a class "
                f"(classes: {', '.join(self.classes)})"
            )
        return codes

    def _check_z(self, z: np.ndarray | Tensor) -> np.ndarray:
        array = _as_numpy(z)
        if array.ndim != 2 or array.shape[1] != self.n_features:
            raise DataError(
                f"encoded rows must have shape (n, {self.n_features}), got {tuple(array.shape)}"
            )
        return array

    def raw_numeric(self, z: np.ndarray | Tensor) -> np.ndarray:
        """float64 ``(n, d)``: ``offset + scale * z``, integer columns rounded; the layout a
        tree ensemble is trained on (numeric columns in raw units, categories one-hot)."""
        raw = self.offset + self.scale * self._check_z(z)
        integer = self.integer
        raw[:, integer] = np.round(raw[:, integer])
        return raw

    def decode(self, z: np.ndarray | Tensor) -> pd.DataFrame:
        """Encoded rows back in raw terms: floats, integers as int64, categories as text."""
        array = self._check_z(z)
        raw = self.raw_numeric(array)
        data: dict[str, Any] = {}
        for start, column in zip(self.starts, self.columns, strict=True):
            if column.type == "categorical":
                group = array[:, start : start + column.width]
                data[column.name] = np.array(column.categories, dtype=object)[group.argmax(1)]
            elif column.type in ("integer", "binary"):
                data[column.name] = raw[:, start].astype(np.int64)
            else:
                data[column.name] = raw[:, start]
        return pd.DataFrame(data, columns=list(self.feature_columns))

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        """A plain, JSON-safe dict that :meth:`from_json` turns back into this encoding."""
        return {
            "format": ENCODING_FORMAT,
            "version": ENCODING_VERSION,
            "label": self.label,
            "classes": list(self.classes),
            "positive": self.positive,
            "columns": [
                {
                    "name": c.name,
                    "type": c.type,
                    "offset": c.offset,
                    "scale": c.scale,
                    "categories": list(c.categories),
                    "mutable": c.mutable,
                    "direction": c.direction,
                }
                for c in self.columns
            ],
            "rules": [
                {"text": r.text, "coefficients": dict(r.coefficients), "bound": r.bound}
                for r in self.rules
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TableEncoding:
        """The encoding :meth:`to_json` described.

        Raises:
            DataError: not such a dict, or an inconsistent one.
        """
        try:
            if data.get("format") != ENCODING_FORMAT or data.get("version") != ENCODING_VERSION:
                raise ValueError(f"not an {ENCODING_FORMAT} version {ENCODING_VERSION}")
            columns = tuple(
                EncodedColumn(
                    name=str(c["name"]),
                    type=_choice(c["type"], COLUMN_TYPES, "type"),
                    offset=float(c["offset"]),
                    scale=_positive(c["scale"]),
                    categories=tuple(str(v) for v in c["categories"]),
                    mutable=bool(c["mutable"]),
                    direction=_choice(c["direction"], DIRECTIONS, "direction"),
                )
                for c in data["columns"]
            )
            rules = tuple(
                LinearRule(
                    coefficients={str(k): float(v) for k, v in r["coefficients"].items()},
                    bound=float(r["bound"]),
                    text=str(r["text"]),
                )
                for r in data["rules"]
            )
            positive = data.get("positive")
            encoding = cls(
                label=str(data["label"]),
                classes=tuple(str(v) for v in data["classes"]),
                columns=columns,
                rules=rules,
                positive=None if positive is None else str(positive),
            )
            encoding.check()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"invalid table encoding: {exc}") from None
        return encoding

    def check(self) -> None:
        """Raise ValueError where the encoding contradicts itself."""
        names = set(self.feature_columns)
        if len(names) != len(self.columns) or not self.columns:
            raise ValueError("feature columns must be unique and at least one")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError("at least 2 distinct classes are needed")
        if self.positive is not None and self.positive not in self.classes:
            raise ValueError(f"positive class {self.positive!r} is not a class")
        for column in self.columns:
            if column.type == "categorical" and not column.categories:
                raise ValueError(f"categorical column {column.name!r} has no categories")
        for rule in self.rules:
            unknown = [name for name in rule.coefficients if name not in names]
            if unknown:
                raise ValueError(f"rule {rule.text!r} names unknown columns {unknown}")


def _choice(value: object, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}")
    return str(value)


def _positive(value: object) -> float:
    number = float(value)  # type: ignore[arg-type]  # JSON value; bad ones raise, caught above
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"scale must be a finite number > 0, got {value!r}")
    return number
