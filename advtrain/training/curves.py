"""``curves.png``: a run's learning curves, redrawn after every epoch.

Three panels: clean and robust validation accuracy, training loss, and the learning rate (with
eps on a second axis when it changes, during an eps warm-up). Drawn with matplotlib's Agg
canvas directly (no pyplot, so no global backend is set and no window opens), imported only
when a figure is drawn, and written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..util import atomic_write_bytes


def render_curves(history: Sequence[Mapping[str, float]]) -> bytes:
    """The PNG bytes of the curves of ``history`` (one mapping per epoch, as in metrics.jsonl)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [int(r["epoch"]) for r in history]
    figure = Figure(figsize=(11, 3.2))
    FigureCanvasAgg(figure)
    accuracy, loss, lr = figure.subplots(1, 3)
    figure.subplots_adjust(left=0.05, right=0.95, bottom=0.16, top=0.9, wspace=0.3)
    marker = "o" if len(epochs) <= 40 else None
    accuracy.plot(epochs, [r["val_clean_accuracy"] for r in history], marker=marker, label="clean")
    accuracy.plot(
        epochs, [r["val_robust_accuracy"] for r in history], marker=marker, label="robust (PGD)"
    )
    accuracy.set_ylim(0, 1)
    accuracy.set_title("validation accuracy")
    accuracy.legend(loc="lower right")
    loss.plot(epochs, [r["train_loss"] for r in history], marker=marker, color="tab:red")
    loss.set_title("training loss")
    lr.plot(epochs, [r["lr"] for r in history], marker=marker, color="tab:green")
    lr.set_title("learning rate (end of epoch)")
    eps = [r.get("eps") for r in history]
    if all(e is not None for e in eps) and len(set(eps)) > 1:
        twin = lr.twinx()
        twin.plot(epochs, eps, linestyle="--", color="tab:purple")
        twin.set_ylabel("eps", color="tab:purple")
    for axes in (accuracy, loss, lr):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def write_curves(history: Sequence[Mapping[str, float]], path: str | Path) -> None:
    """Draw ``history`` and write it to ``path`` (a PNG) atomically."""
    atomic_write_bytes(path, render_curves(history))
