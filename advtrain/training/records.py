"""What a run records: one line per epoch, the run's progress, and its outcome."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class EpochRecord:
    """What one epoch measured; ``lr`` and ``eps`` are those of its last batch.

    On a dataset with a positive class the record also holds that class's validation recall and
    PR-AUC, clean and under the validation attack (see :mod:`advtrain.training.validation`);
    elsewhere they are None and left out of :meth:`to_dict`. With ``class_weight`` set, the
    training loss and accuracy are those of the balanced batches.
    """

    epoch: int
    train_loss: float
    train_accuracy: float
    val_clean_accuracy: float
    val_robust_accuracy: float
    lr: float
    seconds: float
    eps: float
    val_clean_recall: float | None = None
    val_robust_recall: float | None = None
    val_clean_pr_auc: float | None = None
    val_robust_pr_auc: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class RunState:
    """The progress of a run that the epoch loop and its observers share (and a resume restores):
    the epochs done, the best one with its weights, the optimizer step, why the run stops."""

    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    #: the kept epoch's ranking key (see :func:`advtrain.training.observers.selection_key`)
    best_key: tuple[float, ...] | None = None
    best_state: dict[str, Tensor] | None = None
    global_step: int = 0
    stop_reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    next_epoch: int = 1
    #: resume checkpoints written so far (the newest has the highest)
    serial: int = 0


@dataclass
class TrainResult:
    """The outcome of :meth:`~advtrain.training.Trainer.fit`."""

    best_epoch: int
    history: list[EpochRecord]
    test_clean_accuracy: float
    test_robust_accuracy: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "test_clean_accuracy": self.test_clean_accuracy,
            "test_robust_accuracy": self.test_robust_accuracy,
            "seconds": self.seconds,
            "history": [r.to_dict() for r in self.history],
            **self.extra,
        }
