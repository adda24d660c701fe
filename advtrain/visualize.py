"""Pictures of adversarial examples, drawn with matplotlib's Agg renderer into PNG files.

matplotlib is imported inside the functions and only its object-oriented API is used (a
``Figure`` with an Agg canvas), so importing this module costs nothing and pyplot's global state
and backend are never touched.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AdvtrainError
from .util import atomic_write_bytes

__all__ = ["adversarial_grid"]

#: Colour of a prediction that differs from the label.
WRONG = "#c0392b"
RIGHT = "#222222"


def adversarial_grid(
    x: Any,
    x_adv: Any,
    y: Any,
    pred_clean: Any,
    pred_adv: Any,
    path: str | Path,
    rows: int = 8,
    class_names: Sequence[str] | None = None,
    feature_names: Sequence[str] | None = None,
) -> Path:
    """Draw the first ``rows`` clean/adversarial pairs into a PNG at ``path`` (written atomically).

    Images (``(N, C, H, W)`` with C = 1 or 3, or ``(N, H, W)``): one row per sample and three
    columns, the clean input (title: label and prediction), the perturbation ``x_adv - x`` scaled
    so that the largest absolute value shown reaches the end of the colour range, with grey for 0,
    and the adversarial input (title: its prediction, in red when it differs from the label).
    Images with another number of channels are drawn as the mean over channels.

    Tabular data (``(N, D)``): a heatmap of the perturbation of the first ``rows`` samples by
    feature (blue negative, red positive, white 0), one row per sample labelled with its label
    and both predictions; ``feature_names`` label the feature axis.

    Inputs may be tensors or arrays; ``class_names`` turn class indices into names.
    """
    x, x_adv = _array(x, "x", float), _array(x_adv, "x_adv", float)
    if x.shape != x_adv.shape:
        raise AdvtrainError(f"x has shape {x.shape} but x_adv has shape {x_adv.shape}")
    if x.ndim < 2:
        raise AdvtrainError(f"x must be a batch (N, ...), got shape {x.shape}")
    labels = {
        name: _array(value, name, np.int64)
        for name, value in (("y", y), ("pred_clean", pred_clean), ("pred_adv", pred_adv))
    }
    for name, value in labels.items():
        if value.shape != (len(x),):
            raise AdvtrainError(f"{name} must have shape ({len(x)},), got {value.shape}")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise AdvtrainError(f"rows must be a positive integer, got {rows!r}")
    n = min(rows, len(x))
    if n == 0:
        raise AdvtrainError("nothing to draw: no samples")
    if feature_names is not None and x.ndim == 2 and len(feature_names) != x.shape[1]:
        raise AdvtrainError(f"{len(feature_names)} feature names given for {x.shape[1]} features")

    namer = _Namer(class_names)
    y_, clean_, adv_ = (labels[k][:n] for k in ("y", "pred_clean", "pred_adv"))
    if x.ndim == 2:
        figure = _tabular(x[:n], x_adv[:n], y_, clean_, adv_, namer, feature_names)
    elif x.ndim in (3, 4):
        figure = _images(x[:n], x_adv[:n], y_, clean_, adv_, namer)
    else:
        raise AdvtrainError(
            f"cannot draw inputs of shape {x.shape[1:]}: expected (C, H, W), (H, W) or (D,)"
        )
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


class _Namer:
    def __init__(self, class_names: Sequence[str] | None) -> None:
        self.names = None if class_names is None else [str(c) for c in class_names]

    def __call__(self, index: int) -> str:
        if self.names is not None and 0 <= index < len(self.names):
            return self.names[index]
        return str(index)


def _array(value: Any, name: str, dtype: type) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        raise AdvtrainError(f"{name} must be an array or tensor") from None
    if dtype is float:
        if not np.issubdtype(array.dtype, np.number) and array.dtype != bool:
            raise AdvtrainError(f"{name} must hold numbers, got {array.dtype}")
        return array.astype(np.float64)
    if not np.issubdtype(array.dtype, np.integer):
        raise AdvtrainError(f"{name} must hold integer class labels, got {array.dtype}")
    return array.astype(dtype)


def _as_hwc(batch: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, C, H, W) -> (N, H, W, 1 or 3)."""
    if batch.ndim == 3:
        return batch[..., None]
    channels = batch.shape[1]
    if channels not in (1, 3):
        batch = batch.mean(axis=1, keepdims=True)
    return np.moveaxis(batch, 1, -1)


def _show(ax: Any, image: np.ndarray, low: float, high: float) -> None:
    """Draw one (H, W, 1 or 3) image mapped from [low, high] to the colour range."""
    scaled = np.clip((image - low) / (high - low), 0.0, 1.0)
    if scaled.shape[-1] == 1:
        ax.imshow(scaled[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(scaled, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _images(
    x: np.ndarray,
    x_adv: np.ndarray,
    y: np.ndarray,
    clean: np.ndarray,
    adv: np.ndarray,
    name: _Namer,
) -> Any:
    from matplotlib.figure import Figure

    x, x_adv = _as_hwc(x), _as_hwc(x_adv)
    delta = x_adv - x
    low = min(0.0, float(min(x.min(), x_adv.min())))
    high = max(1.0, float(max(x.max(), x_adv.max())))
    largest = float(np.abs(delta).max())
    spread = largest or 1.0  # no change at all: every pixel grey
    n = len(x)
    figure = Figure(figsize=(6.0, 2.0 * n + 0.4))
    axes = figure.subplots(n, 3, squeeze=False)
    for i in range(n):
        label = int(y[i])
        _show(axes[i, 0], x[i], low, high)
        axes[i, 0].set_title(
            f"label {name(label)}, pred {name(int(clean[i]))}",
            fontsize=9,
            color=RIGHT if clean[i] == label else WRONG,
        )
        # grey is 0; the largest absolute change shown reaches black or white
        _show(axes[i, 1], delta[i], -spread, spread)
        axes[i, 1].set_title(f"\u00b1{largest:.3g}", fontsize=9)
        _show(axes[i, 2], x_adv[i], low, high)
        axes[i, 2].set_title(
            f"pred {name(int(adv[i]))}", fontsize=9, color=RIGHT if adv[i] == label else WRONG
        )
    for ax, header in zip(axes[0], ("clean", "perturbation", "adversarial")):
        ax.set_title(f"{header}\n{ax.get_title()}", fontsize=9, color=ax.title.get_color())
    figure.tight_layout()
    return figure


def _tabular(
    x: np.ndarray,
    x_adv: np.ndarray,
    y: np.ndarray,
    clean: np.ndarray,
    adv: np.ndarray,
    name: _Namer,
    feature_names: Sequence[str] | None,
) -> Any:
    from matplotlib.figure import Figure

    delta = x_adv - x
    n, d = delta.shape
    largest = float(np.abs(delta).max()) or 1.0
    label_room = (
        0.09 * max((len(str(f)) for f in feature_names), default=0) if feature_names else 0.4
    )
    figure = Figure(figsize=(max(6.0, 0.28 * d + 3.5), 0.4 * n + 1.2 + label_room))
    ax = figure.subplots()
    image = ax.imshow(
        delta, cmap="RdBu_r", vmin=-largest, vmax=largest, aspect="auto", interpolation="nearest"
    )
    ax.set_yticks(range(n))
    ax.set_yticklabels(
        [
            f"#{i}: label {name(int(y[i]))}, pred {name(int(clean[i]))} \u2192 {name(int(adv[i]))}"
            for i in range(n)
        ],
        fontsize=8,
    )
    for tick, changed in zip(ax.get_yticklabels(), adv != y):
        tick.set_color(WRONG if changed else RIGHT)
    if feature_names:
        ax.set_xticks(range(d))
        ax.set_xticklabels([str(f) for f in feature_names], rotation=90, fontsize=7)
    else:
        ax.set_xlabel("feature")
    ax.set_title("perturbation x_adv - x by feature", fontsize=10)
    figure.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
    figure.tight_layout()
    return figure
