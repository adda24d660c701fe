"""A user's own table as a dataset: :func:`load_table` reads a CSV or Parquet file and a schema.

The file is read keeping every cell's original text (CSV: ``dtype=str``,
``keep_default_na=False``; Parquet: each value as ``str`` gives it, which is what
``DataFrame.to_csv`` writes), so adversarial rows can be written back in the user's own terms
(:mod:`advtrain.data.table_output`). The rows are split stratified and seeded
(:func:`advtrain.data.splits.three_way`), a :class:`~advtrain.data.table_encoding.TableEncoding`
is fitted on the training split only, and every split is encoded with it. With a fitted
``encoding`` (a saved run evaluating a new raw file) the whole file is the test split.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import DataError
from ..util import one_line
from .base import Dataset, DatasetInfo, RawTable, make_split
from .schema import TableSchema, parse_schema
from .splits import check_fractions, three_way
from .table_encoding import TableEncoding, label_texts, sorted_classes

#: File formats :func:`load_table` reads, by suffix.
TABLE_SUFFIXES: tuple[str, ...] = (".csv", ".parquet")
#: Default linf radius in the scaled feature space when the schema has no ``[threat] eps``.
TABLE_EPS = 0.05

SchemaSource = TableSchema | str | Path | Mapping[str, Any]


def load_table(
    path: str | Path,
    schema: SchemaSource | None,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    encoding: TableEncoding | None = None,
) -> Dataset:
    """Load a CSV or Parquet table as a :class:`Dataset` of encoded rows.

    Args:
        path: a ``.csv`` or ``.parquet`` file with a header row.
        schema: a :class:`TableSchema`, or what :func:`parse_schema` reads (a TOML path or text,
            or a mapping); may be None only with ``encoding``.
        seed: seed of the stratified split.
        val_fraction, test_fraction: shares of all rows in ``val`` and ``test``.
        encoding: a fitted encoding (of a saved run): the whole file becomes the test split,
            encoded with it; ``train`` and ``val`` are empty.

    Raises:
        DataError: an unreadable file or unknown suffix, a schema error, a missing label column,
            fewer than 2 classes, a bad cell, an unseen category.
    """
    parsed = None if schema is None else _schema(schema)
    if parsed is None and encoding is None:
        raise DataError("load_table needs a schema (or a fitted encoding)")
    text, terminator = read_table(path)
    return table_dataset(
        text,
        parsed,
        name=Path(path).name,
        path=Path(path),
        line_terminator=terminator,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        encoding=encoding,
    )


def _schema(schema: SchemaSource) -> TableSchema:
    return schema if isinstance(schema, TableSchema) else parse_schema(schema)


def read_table(path: str | Path) -> tuple[pd.DataFrame, str]:
    """The table's cells as text (all columns, file order) and its line terminator.

    Raises:
        DataError: a missing or unreadable file, an unknown suffix, duplicate column names.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(
            f"cannot read table '{path}': unknown format {suffix or '(no suffix)'!r}; "
            f"use one of: {', '.join(TABLE_SUFFIXES)}"
        )
    if not path.is_file():
        raise DataError(f"table file '{path}' does not exist")
    try:
        if suffix == ".csv":
            return _read_csv(path)
        return _text_frame(pd.read_parquet(path, engine="pyarrow")), "\n"
    except DataError:
        raise
    except Exception as exc:  # pandas', pyarrow's (ArrowInvalid...) and OS errors alike
        raise DataError(f"cannot read table '{path}': {one_line(exc)}") from None


def _read_csv(path: Path) -> tuple[pd.DataFrame, str]:
    with path.open("rb") as handle:
        first = handle.readline()
    terminator = "\r\n" if first.endswith(b"\r\n") else "\n"
    with path.open(encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise DataError(f"table file '{path}' is empty (no header row)")
    _check_header([str(name) for name in header], path)
    with warnings.catch_warnings():
        # A row longer than the header: pandas would drop its extra cells with a warning.
        warnings.simplefilter("error", pd.errors.ParserWarning)
        frame = pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            encoding="utf-8-sig",
            index_col=False,
        )
    return frame, terminator


def _check_header(names: list[str], path: Path | None) -> None:
    where = f"table '{path}'" if path else "table"
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"{where} has duplicate column names: {', '.join(map(repr, duplicates))}")
    if any(not name.strip() for name in names):
        raise DataError(f"{where} has a column without a name")


def _text_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Every cell as the text ``DataFrame.to_csv`` would write (missing cells empty)."""
    names = [str(name) for name in frame.columns]
    _check_header(names, None)
    data = {}
    for name, column in zip(names, frame.columns, strict=True):
        values = frame[column].to_numpy(dtype=object)
        missing = pd.isna(frame[column]).to_numpy()
        data[name] = ["" if gone else str(v) for v, gone in zip(values, missing, strict=True)]
    return pd.DataFrame(data, columns=names, dtype=object)


def table_dataset(
    text: pd.DataFrame,
    schema: TableSchema | None,
    *,
    name: str,
    path: Path | None = None,
    line_terminator: str = "\n",
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    encoding: TableEncoding | None = None,
) -> Dataset:
    """Split, fit the encoding on the training rows and encode: the body of :func:`load_table`.

    ``text`` holds every cell as a string (see :func:`read_table`).
    """
    check_fractions(val_fraction, test_fraction)
    if encoding is None:
        assert schema is not None  # load_table refuses neither
        schema.check_columns(text.columns)
        labels = label_texts(text[schema.label], schema.label)
        classes = sorted_classes(list(labels))
        if len(classes) < 2:
            raise DataError(
                f"label column {schema.label!r} has {len(classes)} class(es) "
                f"({', '.join(classes)}); at least 2 are needed"
            )
        index = {value: i for i, value in enumerate(classes)}
        y_all = np.array([index[value] for value in labels], dtype=np.int64)
        train, val, test = _split(y_all, classes, schema.label, val_fraction, test_fraction, seed)
        encoding = TableEncoding.fit(text.iloc[train].reset_index(drop=True), schema)
    else:
        train = val = np.zeros(0, dtype=np.int64)
        test = np.arange(len(text), dtype=np.int64)
    x = encoding.encode(text)
    y = encoding.encode_labels(text)
    constraints = encoding.feature_constraints()
    mutable = encoding.mutable
    info = DatasetInfo(
        name=name,
        kind="tabular",
        classes=encoding.classes,
        shape=(encoding.n_features,),
        lower=torch.as_tensor(encoding.lower),
        upper=torch.as_tensor(encoding.upper),
        mutable=None if mutable.all() else torch.as_tensor(mutable),
        default_eps=TABLE_EPS if schema is None or schema.eps is None else schema.eps,
        positive_class=encoding.positive_class,
        feature_names=encoding.names,
        encoding=encoding,
        constraints=constraints,
    )
    table = RawTable(text=text, encoding=encoding, path=path, line_terminator=line_terminator)
    return Dataset(
        info=info,
        train=make_split(x[train], y[train], train),
        val=make_split(x[val], y[val], val),
        test=make_split(x[test], y[test], test),
        table=table,
    )


def _split(
    y: np.ndarray,
    classes: tuple[str, ...],
    label: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts = np.bincount(y, minlength=len(classes))
    needed = 3
    scarce = [f"{classes[i]!r} ({int(n)} rows)" for i, n in enumerate(counts) if n < needed]
    if scarce:
        raise DataError(
            f"label column {label!r}: too few rows of class {', '.join(scarce)} for a "
            f"stratified train/val/test split (at least {needed} each)"
        )
    try:
        return three_way(y, val_fraction, test_fraction, seed)
    except ValueError as exc:
        raise DataError(f"cannot split the table by {label!r}: {one_line(exc)}") from None
