"""The training loop: one method's batch loss, validated for robustness after every epoch.

The run directory holds ``config.json`` (the resolved configuration), ``metrics.jsonl`` (one
line per epoch), ``model.safetensors`` with its JSON sidecar (the epoch with the best robust
validation accuracy, Rice et al. 2020 having shown robust overfitting), ``last.safetensors``
(the latest epoch) and ``summary.json`` (test accuracies of the kept model).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from ..attacks import PGD
from ..checkpoint import atomic_write_json, save_checkpoint
from ..data import Dataset
from ..errors import AdvtrainError
from ..evaluation import clean_and_robust_accuracy
from ..threat import ThreatModel
from .config import TrainConfig
from .methods import make_method

BEST = "model.safetensors"
LAST = "last.safetensors"


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; an unusable device is an AdvtrainError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise AdvtrainError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AdvtrainError(f"device {name!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AdvtrainError(
                f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif device.type != "cpu":
        raise AdvtrainError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


@dataclass
class EpochRecord:
    """What one epoch measured."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_clean_accuracy: float
    val_robust_accuracy: float
    lr: float
    seconds: float

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class TrainResult:
    """The outcome of :meth:`Trainer.fit`."""

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


class Trainer:
    """Train ``model`` on ``data`` with ``config``'s method, keeping the most robust epoch.

    Args:
        model: the network (returns logits).
        data: the dataset with its train, validation and test splits.
        config: the run's configuration.
        run_dir: where checkpoints and logs go (``None``: keep everything in memory).
        progress: show a progress bar per epoch.
        log: called with one line of text after each epoch (``None``: silent).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Dataset,
        config: TrainConfig,
        run_dir: str | Path | None = None,
        *,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.data = data
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.threat: ThreatModel = data.info.threat_model(norm=config.norm, eps=config.eps)
        self.loss_fn = make_method(
            config.method, self.threat, steps=config.attack_steps, step_size=config.attack_step_size
        )
        self.optimizer = _make_optimizer(model, config)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.progress = progress
        self.log = log or (lambda line: None)

    # ------------------------------------------------------------------ public
    def fit(self) -> TrainResult:
        cfg = self.config
        start = time.perf_counter()
        seed_everything(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run_dir / "config.json", cfg.to_dict())
            (self.run_dir / "metrics.jsonl").write_text("")
        history: list[EpochRecord] = []
        best_key: tuple[float, float] | None = None
        best_state: dict[str, Tensor] = _state_copy(self.model)
        best_epoch = 0
        for epoch in range(1, cfg.epochs + 1):
            record = self._epoch(epoch, generator)
            history.append(record)
            key = self._selection_key(record)
            if best_key is None or key > best_key:
                best_key, best_epoch, best_state = key, epoch, _state_copy(self.model)
                self._save(BEST, record)
            self._save(LAST, record)
            self._append_metrics(record)
            self.log(
                f"epoch {epoch:>3}/{cfg.epochs}  loss {record.train_loss:.4f}  "
                f"val clean {record.val_clean_accuracy:.2%}  val robust {record.val_robust_accuracy:.2%}"
                f"  ({record.seconds:.1f}s)"
            )
        self.model.load_state_dict(best_state)
        test_attack = self.test_attack()
        test = clean_and_robust_accuracy(
            self.model, self.data.test.x.to(self.device), self.data.test.y.to(self.device),
            test_attack, batch_size=cfg.eval_batch_size,
        )
        result = TrainResult(
            best_epoch=best_epoch, history=history,
            test_clean_accuracy=test.clean_accuracy, test_robust_accuracy=test.robust_accuracy,
            seconds=time.perf_counter() - start,
            extra={"test_attack": repr(test_attack), "eps": self.threat.eps,
                   "norm": self.threat.norm},
        )
        if self.run_dir is not None:
            atomic_write_json(self.run_dir / "summary.json", result.to_dict())
        return result

    def _selection_key(self, record: EpochRecord) -> tuple[float, float]:
        """Adversarial methods keep the most robust epoch; standard training the most accurate."""
        if self.config.method == "standard":
            return (record.val_clean_accuracy, record.val_robust_accuracy)
        return (record.val_robust_accuracy, record.val_clean_accuracy)

    def validation_attack(self) -> PGD:
        """The cheap PGD run on the validation split after each epoch."""
        steps = self.config.eval_steps
        return PGD(self.threat, steps=steps, step_size=2.5 * self.threat.eps / steps,
                   seed=self.config.seed)

    def test_attack(self) -> PGD:
        """The PGD that measures the kept model on the test split (40 steps)."""
        return PGD(self.threat, steps=40, step_size=2.5 * self.threat.eps / 40, seed=self.config.seed)

    # ------------------------------------------------------------------ internals
    def _epoch(self, epoch: int, generator: torch.Generator) -> EpochRecord:
        cfg = self.config
        start = time.perf_counter()
        self.model.train()
        total_loss, total_correct, seen = 0.0, 0, 0
        batches = list(_batches(len(self.data.train), cfg.batch_size, generator))
        with _bar(self.progress, f"epoch {epoch}/{cfg.epochs}", len(batches)) as advance:
            for index in batches:
                x = self.data.train.x[index].to(self.device, non_blocking=True)
                y = self.data.train.y[index].to(self.device, non_blocking=True)
                loss, logits = self.loss_fn(self.model, x, y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total_loss += float(loss.detach()) * len(y)
                total_correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(y)
                advance(f"loss {total_loss / seen:.4f}  acc {total_correct / seen:.2%}")
        val = clean_and_robust_accuracy(
            self.model, self.data.val.x.to(self.device), self.data.val.y.to(self.device),
            self.validation_attack(), batch_size=cfg.eval_batch_size,
        )
        return EpochRecord(
            epoch=epoch, train_loss=total_loss / seen, train_accuracy=total_correct / seen,
            val_clean_accuracy=val.clean_accuracy, val_robust_accuracy=val.robust_accuracy,
            lr=self.optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - start,
        )

    def _save(self, name: str, record: EpochRecord) -> None:
        if self.run_dir is None:
            return
        info = self.data.info
        meta = {
            "model": self.config.model, "dataset": info.name, "in_shape": list(info.shape),
            "n_classes": info.n_classes, "norm": self.threat.norm, "eps": self.threat.eps,
            "method": self.config.method, **record.to_dict(),
        }
        save_checkpoint(self.run_dir / name, self.model.state_dict(), meta)

    def _append_metrics(self, record: EpochRecord) -> None:
        if self.run_dir is None:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record.to_dict(), sort_keys=True) + "\n")


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _state_copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _batches(n: int, size: int, generator: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, size):
        yield order[i : i + size]


class _bar:
    """A rich progress bar, or nothing, used as ``with _bar(...) as advance: advance(text)``."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled, self.label, self.total = enabled, label, total
        self.progress: Progress | None = None

    def __enter__(self) -> Callable[[str], None]:
        console = Console(stderr=True)
        if not self.enabled or not console.is_terminal:
            return lambda text: None
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), transient=True,
            console=console,
        )
        self.progress.start()
        task = self.progress.add_task(self.label, total=self.total, status="")
        progress = self.progress
        return lambda text: progress.update(task, advance=1, status=text)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
