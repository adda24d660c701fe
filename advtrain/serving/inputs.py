"""A request's inputs as a batch the model takes, or a 4xx naming what is wrong with them.

Three bodies are read, by their content type:

- ``application/json``: ``{"inputs": [x1, x2, ...]}``, each input shaped as the data (nested
  lists of the sample shape, or the same numbers flat);
- ``text/csv``: one input per row; for a table run, rows of the table's raw columns with a
  header (encoded as in training), else rows of the input's numbers, flat;
- ``image/png``, ``image/jpeg``, ...: one image, for an image run, converted to the run's
  channels and resized to its size, scaled to [0, 1].

Every check is made before the model sees anything: the batch size, the shape, finite numbers,
and the input bounds of the threat model. Nothing here imports the web framework.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import AdvtrainError


class InputError(AdvtrainError):
    """A request the service refuses: ``status`` (4xx) and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InputSpec:
    """What the served model takes: the sample shape, the bounds, the batch limit, and for a
    table run its encoding (raw CSV rows are encoded with it)."""

    shape: tuple[int, ...]
    lower: float | Tensor
    upper: float | Tensor
    max_batch: int = 256
    kind: str = "image"
    encoding: Any = None  # advtrain.data.TableEncoding of a table run

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def parse_body(body: bytes, content_type: str, spec: InputSpec) -> Tensor:
    """The float32 batch ``(n, *shape)`` a request body holds, checked against ``spec``."""
    kind = content_type.split(";")[0].strip().lower() or "application/json"
    if kind in ("application/json", "text/json") or kind.endswith("+json"):
        batch = _json_batch(body, spec)
    elif kind in ("text/csv", "application/csv"):
        batch = _csv_batch(body, spec)
    elif kind.startswith("image/"):
        batch = _image_batch(body, spec)
    else:
        raise InputError(
            415,
            f"unsupported content type {kind!r}: send application/json, text/csv or an image",
        )
    return check_batch(batch, spec)


def _json_batch(body: bytes, spec: InputSpec) -> np.ndarray:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(400, f"malformed JSON: {exc}") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise InputError(422, 'the body must be a JSON object {"inputs": [input, ...]}')
    inputs = payload["inputs"]
    if not isinstance(inputs, list):
        raise InputError(422, f"'inputs' must be a list of inputs, got {type(inputs).__name__}")
    _check_count(len(inputs), spec)
    try:
        array = np.asarray(inputs, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        why = (
            "ragged nested lists" if "inhomogeneous" in str(exc) else "values that are not numbers"
        )
        raise InputError(
            422, f"'inputs' holds {why}: each input must be {_shape_text(spec)}"
        ) from None
    return array


def _csv_batch(body: bytes, spec: InputSpec) -> np.ndarray:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(400, "the CSV body is not UTF-8 text") from None
    if spec.encoding is not None:
        return _table_rows(text, spec)
    rows = [line for line in text.splitlines() if line.strip()]
    _check_count(len(rows), spec)
    try:
        values = [[float(cell) for cell in row.split(",")] for row in rows]
    except ValueError:
        raise InputError(422, "the CSV rows must hold numbers only (no header)") from None
    widths = {len(row) for row in values}
    if widths != {spec.size}:
        raise InputError(
            422, f"each CSV row must hold {spec.size} numbers, got {sorted(widths)} per row"
        )
    return np.asarray(values, dtype=np.float64)


def _table_rows(text: str, spec: InputSpec) -> np.ndarray:
    import pandas as pd

    try:
        frame = pd.read_csv(io.StringIO(text))
    except Exception as exc:  # pandas' parser errors have several types
        raise InputError(400, f"malformed CSV: {' '.join(str(exc).split())}") from None
    _check_count(len(frame), spec)
    try:
        return np.asarray(spec.encoding.encode(frame), dtype=np.float64)
    except AdvtrainError as exc:
        raise InputError(422, str(exc)) from None


def _image_batch(body: bytes, spec: InputSpec) -> np.ndarray:
    if spec.kind != "image" or len(spec.shape) != 3 or spec.shape[0] not in (1, 3):
        raise InputError(415, f"this model takes inputs of shape {spec.shape}, not images")
    from PIL import Image, UnidentifiedImageError

    channels, height, width = spec.shape
    try:
        with Image.open(io.BytesIO(body)) as image:
            picture = image.convert("L" if channels == 1 else "RGB").resize((width, height))
            pixels = np.asarray(picture, dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(400, f"unreadable image: {' '.join(str(exc).split())}") from None
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    lower, upper = float(np.min(_bound(spec.lower))), float(np.max(_bound(spec.upper)))
    return (lower + pixels * (upper - lower))[None]


def _bound(value: float | Tensor) -> np.ndarray:
    return value.numpy() if isinstance(value, Tensor) else np.asarray(value)


def _check_count(n: int, spec: InputSpec) -> None:
    if n == 0:
        raise InputError(422, "the batch is empty: send at least one input")
    if n > spec.max_batch:
        raise InputError(413, f"a batch of {n} inputs exceeds the limit of {spec.max_batch}")


def _shape_text(spec: InputSpec) -> str:
    flat = f" (or {spec.size} numbers flat)" if len(spec.shape) > 1 else ""
    return f"of shape {list(spec.shape)}{flat}"


def check_batch(array: np.ndarray, spec: InputSpec) -> Tensor:
    """``array`` as a float32 batch of ``spec``'s shape: finite, inside the bounds."""
    n = array.shape[0] if array.ndim else 0
    _check_count(n, spec)
    if tuple(array.shape[1:]) == (spec.size,) and len(spec.shape) > 1:
        array = array.reshape(n, *spec.shape)
    if tuple(array.shape[1:]) != spec.shape:
        raise InputError(
            422, f"each input must be {_shape_text(spec)}, got shape {list(array.shape[1:])}"
        )
    if not np.isfinite(array).all():
        raise InputError(422, "inputs contain NaN or infinite values")
    lower, upper = _bound(spec.lower), _bound(spec.upper)
    below, above = array < lower - 1e-6, array > upper + 1e-6
    if below.any() or above.any():
        raise InputError(
            422,
            f"values outside the input bounds [{float(lower.min()):g}, {float(upper.max()):g}]: "
            f"min {float(array.min()):g}, max {float(array.max()):g} (scale pixels to the "
            "model's range)",
        )
    return torch.from_numpy(np.clip(array, lower, upper).astype(np.float32))
