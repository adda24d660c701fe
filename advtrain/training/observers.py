"""Observers of the epoch loop: what happens after each epoch besides training.

After each epoch the trainer appends its :class:`~advtrain.training.records.EpochRecord` to the
run's history and hands an :class:`EpochEnd` to each observer in turn:

- :class:`BestEpoch` keeps the best epoch's weights (``model.safetensors``) by the run's
  validation figure (``select_by``, see :func:`selection_key`): the most robust on the
  validation split for adversarial methods, Rice, Wong & Kolter (2020) having shown robust
  overfitting; the most accurate for standard training; on a dataset with a positive class
  (fraud) by default its robust PR-AUC, since there a model that flags nothing has the
  majority class's share as its robust accuracy (and one that flags everything a recall of 1);
- :class:`RunFiles` writes the latest epoch (``last.safetensors``) and ``metrics.jsonl``;
- :class:`TensorBoard` logs the epoch's figures; :class:`EpochLog` says one line;
- :class:`CatastrophicWatch` and :class:`EarlyStop` decide whether the run stops;
- :class:`Curves` redraws ``curves.png``.

An observer may set ``run.stop_reason``; the loop then ends after the epoch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..checkpoint import save_checkpoint
from ..data.base import DatasetInfo
from ..errors import AdvtrainError
from ..threat import ThreatModel
from ..util import one_line
from .config import TrainConfig
from .records import EpochRecord, RunState

BEST = "model.safetensors"
LAST = "last.safetensors"
CURVES = "curves.png"
#: curves.png waits this many times its drawing time before it is redrawn (the last epoch's
#: figure is always drawn): at most a tenth of a run goes into figures.
CURVES_BUDGET = 9.0
#: Clean accuracy "holds" when it stays at least this fraction of the best epoch's.
CLEAN_HOLDS = 0.9
#: Catastrophic overfitting needs robustness to lose: the best robust validation accuracy so far
#: must be at least this before a fall counts (early epochs of a strong eps sit near zero and
#: wobble; that is not a collapse).
CO_MIN_ROBUST = 0.2


@dataclass
class EpochEnd:
    """What an observer sees after an epoch: its record (already in ``run.history``), the run's
    progress, the weights the run validates and keeps, and the run's length in epochs."""

    record: EpochRecord
    run: RunState
    kept_model: nn.Module
    run_epochs: int

    @property
    def final(self) -> bool:
        """Whether no epoch follows (the last one, or the run stops)."""
        return self.run.stop_reason is not None or self.record.epoch >= self.run_epochs


class EpochObserver:
    """Something done after each epoch (see the module docstring); every hook is optional."""

    def start(self, run: RunState, resumed: bool) -> None:
        """Called once before the first epoch a :meth:`~advtrain.training.Trainer.fit` runs."""
        del run, resumed

    def epoch_end(self, end: EpochEnd) -> None:
        """Called after each epoch."""
        del end

    def close(self) -> None:
        """Called once when the loop ends, however it ends."""


def json_line(record: EpochRecord) -> str:
    """``record`` as one line of metrics.jsonl."""
    return json.dumps(record.to_dict(), sort_keys=True) + "\n"


def state_copy(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``model``'s weights."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Writer:
    """Saves a model's weights with the run's description in the sidecar (rank 0 only)."""

    def __init__(self, run_dir: Path | None, meta: dict[str, Any]) -> None:
        self.run_dir, self.meta = run_dir, meta

    def save(self, name: str, model: nn.Module, record: EpochRecord) -> None:
        if self.run_dir is not None:
            meta = {**self.meta, **record.to_dict()}
            save_checkpoint(self.run_dir / name, model.state_dict(), meta)


#: A figure a record lacks (no positive class, or undefined) ranks below every real one.
MISSING = -1.0

#: What each ``select_by`` figure ranks by: the record fields, the robust version's names
#: (the clean version's are the same with ``clean`` for ``robust``).
SELECTION_FIELDS = {
    "robust-accuracy": ("val_robust_accuracy", "val_clean_accuracy"),
    "robust-recall": ("val_robust_recall", "val_robust_pr_auc", "val_robust_accuracy"),
    "pr-auc": ("val_robust_pr_auc", "val_robust_recall", "val_robust_accuracy"),
}

#: The words the log and the early stop use for each figure.
SELECTION_NAMES = {
    "robust-accuracy": "validation accuracy",
    "robust-recall": "robust recall of the positive class",
    "pr-auc": "robust PR-AUC of the positive class",
}


def selection_key(record: EpochRecord, select_by: str, robust_first: bool) -> tuple[float, ...]:
    """The key by which ``record`` ranks (higher is better) for figure ``select_by`` (resolved,
    see :meth:`~advtrain.training.config.TrainConfig.selection`).

    ``robust-accuracy``: (robust, clean) accuracy, as before; ``robust-recall``: the positive
    class's robust recall, then its robust PR-AUC, then robust accuracy; ``pr-auc``: robust
    PR-AUC, then robust recall, then robust accuracy. Without ``robust_first`` (standard
    training) the clean version of each figure comes first, then the robust one. A figure the
    record lacks counts as :data:`MISSING`.
    """
    names = SELECTION_FIELDS[select_by]
    if robust_first:
        order = list(names)
    else:
        clean = [name.replace("robust", "clean") for name in names]
        order = list(dict.fromkeys(clean + list(names)))
    values = (getattr(record, name) for name in order)
    return tuple(MISSING if value is None else float(value) for value in values)


class BestEpoch(EpochObserver):
    """Keeps the best epoch so far (its weights in memory and in :data:`BEST`) by
    :func:`selection_key`: adversarial methods rank by the robust figure, ``standard`` training by
    the clean one first; a tie keeps the earlier epoch."""

    def __init__(
        self,
        robust_first: bool,
        run_dir: Path | None,
        meta: dict[str, Any],
        select_by: str = "robust-accuracy",
    ) -> None:
        self.robust_first, self.select_by = robust_first, select_by
        self.writer = _Writer(run_dir, meta)

    def key(self, record: EpochRecord) -> tuple[float, ...]:
        return selection_key(record, self.select_by, self.robust_first)

    def start(self, run: RunState, resumed: bool) -> None:
        # a checkpoint keeps its best key; rank it again as this run ranks (same result when the
        # run's figure is the checkpoint's, which a resume with the same configuration ensures)
        kept = [r for r in run.history if r.epoch == run.best_epoch]
        if resumed and kept:
            run.best_key = self.key(kept[0])

    def epoch_end(self, end: EpochEnd) -> None:
        run, key = end.run, self.key(end.record)
        if run.best_key is None or key > run.best_key:
            run.best_key, run.best_epoch = key, end.record.epoch
            run.best_state = state_copy(end.kept_model)
            self.writer.save(BEST, end.kept_model, end.record)


class RunFiles(EpochObserver):
    """Writes the latest epoch's weights (:data:`LAST`) and appends its line to metrics.jsonl."""

    def __init__(self, run_dir: Path | None, meta: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.writer = _Writer(run_dir, meta)

    def epoch_end(self, end: EpochEnd) -> None:
        self.writer.save(LAST, end.kept_model, end.record)
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json_line(end.record))


def summary_writer_class() -> Any:
    """TensorBoard's ``SummaryWriter``, or a one-line error naming the missing package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise AdvtrainError(
            "tensorboard = true needs the tensorboard package "
            f"(pip install tensorboard): {one_line(exc, 120)}"
        ) from None
    return SummaryWriter


class TensorBoard(EpochObserver):
    """Logs each epoch's figures to ``run_dir/tensorboard`` (a resumed run drops what was logged
    after its checkpoint)."""

    SCALARS = (
        ("loss/train", "train_loss"),
        ("accuracy/train", "train_accuracy"),
        ("accuracy/val_clean", "val_clean_accuracy"),
        ("accuracy/val_robust", "val_robust_accuracy"),
        ("lr", "lr"),
        ("eps", "eps"),
        ("positive/val_clean_recall", "val_clean_recall"),
        ("positive/val_robust_recall", "val_robust_recall"),
        ("positive/val_clean_pr_auc", "val_clean_pr_auc"),
        ("positive/val_robust_pr_auc", "val_robust_pr_auc"),
    )

    def __init__(self, run_dir: Path | None) -> None:
        self.writer_class = summary_writer_class()  # fails at once, before any training
        self.run_dir = run_dir
        self.writer: Any = None

    def start(self, run: RunState, resumed: bool) -> None:
        if self.run_dir is not None:
            self.writer = self.writer_class(
                log_dir=str(self.run_dir / "tensorboard"),
                purge_step=run.next_epoch if resumed else None,
            )

    def epoch_end(self, end: EpochEnd) -> None:
        if self.writer is not None:
            values = end.record.to_dict()
            for tag, name in self.SCALARS:
                if name in values:  # the positive class's figures only where there is one
                    self.writer.add_scalar(tag, values[name], end.record.epoch)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class EpochLog(EpochObserver):
    """One line per epoch: loss, validation accuracies, the positive class's robust recall and
    PR-AUC where there is one, the learning rate when it is scheduled, eps while it ramps up, and
    the epoch's time."""

    def __init__(self, log: Callable[[str], None], scheduled: bool, eps: float) -> None:
        self.log, self.scheduled, self.eps = log, scheduled, eps

    def epoch_end(self, end: EpochEnd) -> None:
        record = end.record
        extra = ""
        if record.val_robust_recall is not None:
            extra += f"  robust recall {record.val_robust_recall:.2%}"
        if record.val_robust_pr_auc is not None:
            extra += f"  robust PR-AUC {record.val_robust_pr_auc:.3f}"
        if self.scheduled:
            extra += f"  lr {record.lr:.3g}"
        if record.eps != self.eps:
            extra += f"  eps {record.eps:.4g}"
        self.log(
            f"epoch {record.epoch:>3}/{end.run_epochs}  loss {record.train_loss:.4f}  "
            f"val clean {record.val_clean_accuracy:.2%}  "
            f"val robust {record.val_robust_accuracy:.2%}{extra}  ({record.seconds:.1f}s)"
        )


def catastrophic_overfitting(
    history: list[EpochRecord],
    threshold: float = 0.5,
    clean_holds: float = CLEAN_HOLDS,
    min_robust: float = CO_MIN_ROBUST,
) -> str | None:
    """A message when the last epoch shows catastrophic overfitting, else None.

    Catastrophic overfitting (Wong, Rice & Kolter, "Fast is better than free", ICLR 2020): with
    single-step (FGSM) training, robust accuracy collapses within an epoch while clean accuracy
    holds or rises. Flagged when the last epoch's robust validation accuracy is below
    ``threshold`` times the best of the earlier epochs while its clean accuracy is at least
    ``clean_holds`` times that best epoch's, and only once that best reached ``min_robust``.
    """
    if len(history) < 2:
        return None
    last = history[-1]
    best = max(history[:-1], key=lambda r: (r.val_robust_accuracy, -r.epoch))
    if best.val_robust_accuracy <= 0 or best.val_robust_accuracy < min_robust:
        return None
    if last.val_robust_accuracy >= threshold * best.val_robust_accuracy:
        return None
    if last.val_clean_accuracy < clean_holds * best.val_clean_accuracy:
        return None
    return (
        f"catastrophic overfitting (Wong et al. 2020) at epoch {last.epoch}: robust validation "
        f"accuracy fell to {last.val_robust_accuracy:.1%}, below {threshold:g} x the best "
        f"{best.val_robust_accuracy:.1%} (epoch {best.epoch}), while clean accuracy held at "
        f"{last.val_clean_accuracy:.1%}"
    )


class CatastrophicWatch(EpochObserver):
    """Watches for :func:`catastrophic_overfitting`: ``stop`` ends the run (the best epoch is
    kept), ``warn`` records a warning and goes on."""

    def __init__(self, mode: str, threshold: float, log: Callable[[str], None]) -> None:
        self.mode, self.threshold, self.log = mode, threshold, log

    def epoch_end(self, end: EpochEnd) -> None:
        run = end.run
        message = catastrophic_overfitting(run.history, self.threshold)
        if message is None:
            return
        if self.mode == "stop":
            run.stop_reason = f"{message}; stopping, keeping epoch {run.best_epoch}"
            self.log(run.stop_reason)
        else:
            run.warnings.append(message)
            self.log(f"warning: {message}")


class EarlyStop(EpochObserver):
    """Stops the run after ``patience`` epochs without a better validation figure (the one
    :class:`BestEpoch` keeps by, named ``figure`` in the message)."""

    def __init__(
        self, patience: int, log: Callable[[str], None], figure: str = "validation accuracy"
    ) -> None:
        self.patience, self.log, self.figure = patience, log, figure

    def epoch_end(self, end: EpochEnd) -> None:
        run, epoch = end.run, end.record.epoch
        if (
            run.stop_reason is None
            and epoch < end.run_epochs
            and epoch - run.best_epoch >= self.patience
        ):
            run.stop_reason = (
                f"early stop after epoch {epoch}: no better {self.figure} for "
                f"{self.patience} epoch(s) since epoch {run.best_epoch}, which is kept"
            )
            self.log(run.stop_reason)


class Curves(EpochObserver):
    """Redraws :data:`CURVES`: after the last epoch always, after others unless epochs are so
    short that drawing would take more than a tenth of the time (it costs a fraction of a
    second)."""

    def __init__(self, run_dir: Path | None, log: Callable[[str], None]) -> None:
        self.run_dir, self.log = run_dir, log
        self.due = 0.0

    def start(self, run: RunState, resumed: bool) -> None:
        self.due = 0.0

    def epoch_end(self, end: EpochEnd) -> None:
        if self.run_dir is None or (not end.final and time.perf_counter() < self.due):
            return
        from .curves import write_curves

        started = time.perf_counter()
        try:
            write_curves([r.to_dict() for r in end.run.history], self.run_dir / CURVES)
        except Exception as exc:  # a figure is never worth a training run
            self.log(f"warning: could not draw {CURVES}: {one_line(exc, 120)}")
        now = time.perf_counter()
        self.due = now + CURVES_BUDGET * (now - started)


def standard_observers(
    config: TrainConfig,
    info: DatasetInfo,
    threat: ThreatModel,
    run_dir: Path | None,
    log: Callable[[str], None],
    catastrophic: str,
    select_by: str = "robust-accuracy",
) -> list[EpochObserver]:
    """The observers of a run of ``config``, in the order they run (see the module docstring);
    ``catastrophic`` is the watch's mode and ``select_by`` the figure that keeps the best epoch,
    both resolved (no ``auto``)."""
    meta = {
        "model": config.model,
        "dataset": info.name,
        "in_shape": list(info.shape),
        "n_classes": info.n_classes,
        "norm": threat.norm,
        "eps": threat.eps,
        "method": config.method,
    }
    found: list[EpochObserver] = [
        BestEpoch(config.method != "standard", run_dir, meta, select_by),
        RunFiles(run_dir, meta),
    ]
    if config.tensorboard:
        found.append(TensorBoard(run_dir))
    found.append(EpochLog(log, config.schedule != "constant", threat.eps))
    if catastrophic != "off":
        found.append(CatastrophicWatch(catastrophic, config.co_threshold, log))
    if config.early_stop is not None:
        found.append(EarlyStop(config.early_stop, log, SELECTION_NAMES[select_by]))
    found.append(Curves(run_dir, log))
    return found
