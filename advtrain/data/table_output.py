"""Adversarial table rows written back in the user's own terms: :func:`write_adversarial_csv`.

Each output row starts from the ORIGINAL TEXT of its row in the input file; only the cells whose
decoded value the attack changed are re-formatted: integers as integers, categories as their text,
floats as the shortest decimal text that encodes to the same scaled value (so reading the file back
gives the very row that was attacked). Every other cell, the label column included, is written
verbatim, and the columns ``pred_clean``, ``pred_adv`` (class names) and ``success`` are added.
Rows are written with :mod:`csv` (minimal quoting) and the input file's line terminator, so a row
the attack left unchanged is byte-identical to its line in a file written the usual way (pandas,
spreadsheets, the csv module); a cell the input quoted without need loses those quotes.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..util import atomic_write_text
from .base import Dataset, RawTable
from .table_encoding import EncodedColumn

#: The columns added to every output row.
OUTPUT_COLUMNS: tuple[str, ...] = ("pred_clean", "pred_adv", "success")
ArrayLike = np.ndarray | Tensor


def _numpy(value: ArrayLike) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def write_adversarial_csv(
    path: str | Path,
    dataset_or_table: Dataset | RawTable,
    rows: ArrayLike,
    x_clean: ArrayLike,
    x_adv: ArrayLike,
    pred_clean: ArrayLike,
    pred_adv: ArrayLike,
    success: ArrayLike,
) -> None:
    """Write attacked rows as CSV in the input's column space (see the module docstring).

    Args:
        path: the CSV file to write (atomically).
        dataset_or_table: a dataset from :func:`advtrain.data.load_table` (or its ``table``).
        rows: ``(n,)`` positions of the rows in the file (``Split.rows`` of the attacked rows).
        x_clean, x_adv: ``(n, d)`` encoded clean and adversarial rows.
        pred_clean, pred_adv: ``(n,)`` predicted class indices.
        success: ``(n,)`` bools, True where the attack succeeded.

    Raises:
        DataError: the dataset was not read from a table, or the arrays do not fit together.
    """
    table = dataset_or_table.table if isinstance(dataset_or_table, Dataset) else dataset_or_table
    if table is None:
        raise DataError("adversarial CSV output needs a dataset read from a table (load_table)")
    encoding = table.encoding
    positions = _numpy(rows).astype(np.int64).reshape(-1)
    clean, adv = _numpy(x_clean), _numpy(x_adv)
    labels = [_numpy(v).reshape(-1) for v in (pred_clean, pred_adv)]
    hits = _numpy(success).astype(bool).reshape(-1)
    n = len(positions)
    sizes = {len(clean), len(adv), len(labels[0]), len(labels[1]), len(hits)}
    if sizes != {n}:
        raise DataError(
            f"adversarial CSV: {n} rows but arrays of lengths {sorted(sizes)} (x_clean, x_adv, "
            "pred_clean, pred_adv and success need one entry per row)"
        )
    if n and (positions.min() < 0 or positions.max() >= len(table.text)):
        raise DataError(f"adversarial CSV: a row position outside the table's {len(table.text)}")
    clashes = [name for name in OUTPUT_COLUMNS if name in table.text.columns]
    if clashes:
        raise DataError(f"adversarial CSV: the table already has columns {', '.join(clashes)}")
    classes = np.array(encoding.classes, dtype=object)
    for predictions in labels:
        if n and (predictions.min() < 0 or predictions.max() >= len(classes)):
            raise DataError(f"adversarial CSV: a prediction outside the {len(classes)} classes")
    cells = table.text.iloc[positions].to_numpy(dtype=object).copy()
    header = [str(name) for name in table.text.columns]
    index = {name: i for i, name in enumerate(header)}
    decoded_clean, decoded_adv = encoding.decode(clean), encoding.decode(adv)
    for start, column in zip(encoding.starts, encoding.columns, strict=True):
        before = decoded_clean[column.name].to_numpy()
        after = decoded_adv[column.name].to_numpy()
        for row in np.flatnonzero(before != after):
            cells[row, index[column.name]] = _cell_text(column, after[row], float(adv[row, start]))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=table.line_terminator)
    writer.writerow([*header, *OUTPUT_COLUMNS])
    for i in range(n):
        writer.writerow(
            [
                *cells[i],
                classes[int(labels[0][i])],
                classes[int(labels[1][i])],
                "True" if hits[i] else "False",
            ]
        )
    atomic_write_text(path, buffer.getvalue())


def _cell_text(column: EncodedColumn, value: object, z: float) -> str:
    """The text of a changed cell: integers whole, categories as text, floats shortest."""
    if column.type in ("integer", "binary"):
        return str(int(value))  # type: ignore[call-overload]  # an int64 from decode
    if column.type == "categorical":
        return str(value)
    return float_text(float(value), z, column.offset, column.scale)  # type: ignore[arg-type]


def float_text(raw: float, z: float, offset: float, scale: float) -> str:
    """The shortest positional decimal text of ``raw`` that scales back to the float32 ``z``."""
    target = np.float32(z)
    for digits in range(1, 18):
        text = np.format_float_positional(raw, precision=digits, unique=False, fractional=False)
        text = text.rstrip(".") if "." in text and text.endswith(".") else text
        scaled = np.clip((float(text) - offset) / scale, 0.0, 1.0)
        if np.float32(scaled) == target:
            return _trim(text)
    return repr(raw)


def _trim(text: str) -> str:
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"
