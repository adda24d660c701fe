"""The training loop: one method's batch loss, validated for robustness after every epoch.

The run directory holds ``config.json`` (the resolved configuration), ``metrics.jsonl`` (one
line per epoch, with the learning rate and eps the epoch ended with), ``model.safetensors`` with
its JSON sidecar (the epoch with the best robust validation accuracy, Rice et al. 2020 having
shown robust overfitting), ``last.safetensors`` (the latest epoch), ``curves.png`` (learning
curves), ``summary.json`` (test accuracies of the kept model), optionally ``tensorboard/``, and
two resume checkpoints ``resume-0.safetensors`` / ``resume-1.safetensors`` with their sidecars.

Resuming. At the end of every epoch (and every ``checkpoint_every`` batches) the trainer writes
everything a run needs to go on as if it had never stopped: the weights, the optimizer state,
the position (epoch, batch, optimizer step: the learning-rate schedule and eps warm-up are
functions of it), the order of the current epoch's batches, the states of the batch generator,
of the global torch RNG (and CUDA's), the best epoch so far with its weights, the history, and
the state a method keeps between batches. Tensors go to the safetensors file (the generator
states as uint8 tensors), the rest to its JSON sidecar. The two slots are written in turn, so
that a process killed while writing one leaves the other intact; :meth:`Trainer.fit` with
``resume=True`` takes the newest slot whose checksum holds. With the same configuration a
resumed run ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from .. import distributed
from ..attacks import PGD
from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import Dataset
from ..data.base import DatasetInfo, Split
from ..errors import AdvtrainError, CheckpointError
from ..evaluation import clean_and_robust_accuracy
from ..threat import ThreatModel
from ..util import atomic_write_json, atomic_write_text, one_line, resolve_device
from .augment import make_augment
from .averaging import WeightAverage
from .config import FGSM_TYPE, TrainConfig
from .methods import make_method
from .schedules import get_schedule

BEST = "model.safetensors"
LAST = "last.safetensors"
RESUME_SLOTS = ("resume-0.safetensors", "resume-1.safetensors")
RESUME_KIND = "advtrain-resume"
CURVES = "curves.png"
#: curves.png waits this many times its drawing time before it is redrawn (the last epoch's
#: figure is always drawn): at most a tenth of a run goes into figures.
CURVES_BUDGET = 9.0

#: Clean accuracy "holds" when it stays at least this fraction of the best epoch's.
CLEAN_HOLDS = 0.9

LossFn = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]


#: Rank r > 0 of a distributed run seeds its own random draws with ``seed + r * stride``.
RANK_SEED_STRIDE = 7919


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


@dataclass
class EpochRecord:
    """What one epoch measured; ``lr`` and ``eps`` are those of its last batch."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_clean_accuracy: float
    val_robust_accuracy: float
    lr: float
    seconds: float
    eps: float

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


# ---------------------------------------------------------------------- pure helpers


def warmup_eps(
    eps: float, epoch: int, batch: int, batches: int, warmup_epochs: int, replays: int = 1
) -> float:
    """eps for batch ``batch`` (0-based) of epoch ``epoch`` (1-based) of ``batches``: a linear
    ramp from 0 that reaches ``eps`` with the last batch of epoch ``warmup_epochs``.

    Epochs count as ``TrainConfig.epochs`` does: a method with ``replays`` runs each minibatch
    that many times, so one of its passes over the data counts as ``replays`` epochs.
    """
    if warmup_epochs <= 0:
        return eps
    progress = ((epoch - 1) * batches + batch + 1) * replays / (warmup_epochs * batches)
    return eps * min(1.0, progress)


#: Catastrophic overfitting needs robustness to lose: the best robust validation accuracy so far
#: must be at least this before a fall counts (early epochs of a strong eps sit near zero and
#: wobble; that is not a collapse).
CO_MIN_ROBUST = 0.2


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


def _mix_fallback(loss_fn: LossFn, adv_ratio: float) -> LossFn:
    """``adv_ratio * method loss + (1 - adv_ratio) * CE(model(x), y)``; the method's logits."""

    def mixed(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss, logits = loss_fn(model, x, y)
        clean = F.cross_entropy(model(x), y)
        return adv_ratio * loss + (1 - adv_ratio) * clean, logits

    return mixed


def _mix(loss_fn: LossFn, adv_ratio: float) -> LossFn:
    try:
        from .methods import mix  # the methods module's own, when it has one
    except ImportError:
        mix = _mix_fallback
    return mix(loss_fn, adv_ratio)


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off":
        return None
    if device.type != "cuda":
        if mode == "auto":
            return None
        raise AdvtrainError(
            f"amp {mode!r} needs a CUDA device; this run's device is {device} "
            '(use amp = "auto" or "off")'
        )
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _use_channels_last(mode: str, device: torch.device, info: DatasetInfo) -> bool:
    images = len(info.shape) == 3
    if mode == "auto":
        return device.type == "cuda" and images
    if mode == "on" and not images:
        raise AdvtrainError(
            f"channels_last is for images (C, H, W); dataset {info.name!r} has "
            f"inputs of shape {tuple(info.shape)}"
        )
    return mode == "on"


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise AdvtrainError(
            "tensorboard = true needs the tensorboard package "
            f"(pip install tensorboard): {one_line(exc, 120)}"
        ) from None
    return SummaryWriter


def _grad_scaler() -> Any:
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()  # pragma: no cover - torch < 2.3


class Trainer:
    """Train ``model`` on ``data`` with ``config``'s method, keeping the most robust epoch.

    Args:
        model: the network (returns logits).
        data: the dataset with its train, validation and test splits.
        config: the run's configuration.
        run_dir: where checkpoints and logs go (``None``: keep everything in memory).
        progress: show a progress bar per epoch.
        log: called with one line of text after each epoch (``None``: silent).

    The method's loss function may carry the attributes of the trainer contract (see
    :mod:`advtrain.training.methods`): ``replays`` (each minibatch is trained on that many
    times, and ``ceil(epochs / replays)`` epochs run), ``on_epoch_start(model, epoch, epochs)``
    and ``uses_input_grad``. A method that keeps state between batches is resumed exactly when
    its loss function offers ``state_dict()``/``load_state_dict()``; otherwise the tensors,
    modules and ``None`` values among its attributes are saved and restored.
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
        self.device = distributed.rank_device(resolve_device(config.device))
        self.rank, self.world = distributed.init_from_env(self.device.type)
        self.amp_dtype = _amp_dtype(config.amp, self.device)
        self.channels_last = _use_channels_last(config.channels_last, self.device, data.info)
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.sync_batchnorm = config.sync_batchnorm and self.world > 1
        if self.sync_batchnorm:
            self.model = distributed.synchronise_batchnorm(self.model, self.device)
        # pinned host memory lets each batch's copy to the GPU run without blocking the host
        self.pin_memory = self.device.type == "cuda"
        # the model the training loss calls (compiled when asked); it shares self.model's weights
        self.train_model = (
            self.model
            if config.compile == "off"
            else torch.compile(self.model, backend=config.compile)
        )
        self.threat: ThreatModel = data.info.threat_model(norm=config.norm, eps=config.eps)
        self._base_loss = self._build_method(self.threat)
        self._loss_eps = self.threat.eps
        self.loss_fn = self._mixed(self._base_loss)
        replays = getattr(self._base_loss, "replays", 1)
        if not isinstance(replays, int) or isinstance(replays, bool) or replays < 1:
            raise AdvtrainError(
                f"method {config.method!r}: replays must be an integer >= 1, got {replays!r}"
            )
        self.replays = replays
        self.run_epochs = math.ceil(config.epochs / replays)
        self.batches_per_epoch = math.ceil(len(data.train) / config.batch_size)
        self.total_steps = self.run_epochs * self.batches_per_epoch * replays
        self.schedule = get_schedule(config.schedule)
        self.augment = make_augment(config.augment, data.info, config.noise_std)
        self.catastrophic = config.catastrophic
        if self.catastrophic == "auto":
            self.catastrophic = "stop" if config.method in FGSM_TYPE else "off"
        self._writer_class = _summary_writer_class() if config.tensorboard else None
        self.optimizer = _make_optimizer(self.model, config)
        self.scaler = _grad_scaler() if self.amp_dtype == torch.float16 else None
        # Every rank reads the run directory (resume); only rank 0 writes to it and speaks.
        self.source_dir = None if run_dir is None else Path(run_dir)
        self.run_dir = self.source_dir if self.rank == 0 else None
        self.progress = progress and self.rank == 0
        self.log = (log if self.rank == 0 else None) or (lambda line: None)
        self.generator = torch.Generator().manual_seed(config.seed)
        self._reset_state()

    # ------------------------------------------------------------------ public
    def fit(self, resume: bool = False) -> TrainResult:
        """Train for the configured epochs (or until an early stop) and measure the kept model.

        ``resume=True`` continues the run in ``run_dir`` from its newest checkpoint (the
        configuration must be the one in its ``config.json``); with no checkpoint there yet, the
        run starts from the beginning.
        """
        cfg = self.config
        start = time.perf_counter()
        self.generator = torch.Generator().manual_seed(cfg.seed)
        checkpoint = self._read_resume() if resume else None
        if self.world > 1:  # every rank has read the run directory before rank 0 rewrites it
            distributed.barrier()
        resumed = checkpoint is not None
        if checkpoint is None:
            seed_everything(cfg.seed)
            if self.rank > 0:  # random starts and noise of their own on each rank
                torch.manual_seed(cfg.seed + RANK_SEED_STRIDE * self.rank)
            self._start_fresh()
        else:
            self._restore(*checkpoint)
        writer = self._open_writer(resumed)
        try:
            while self.stop_reason is None and self._next_epoch <= self.run_epochs:
                record = self._epoch(self._next_epoch, self.generator)
                self._finish_epoch(record, writer)
        finally:
            if writer is not None:
                writer.close()
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        elif self.average is not None:
            self.model.load_state_dict(self.average.state_dict())
        test_attack = self.test_attack()
        test_clean, test_robust = self._measure(self.data.test, test_attack, self.model)
        result = TrainResult(
            best_epoch=self.best_epoch,
            history=list(self.history),
            test_clean_accuracy=test_clean,
            test_robust_accuracy=test_robust,
            seconds=time.perf_counter() - start,
            extra={
                "test_attack": repr(test_attack),
                "eps": self.threat.eps,
                "norm": self.threat.norm,
                "epochs_run": len(self.history),
                "stop_reason": self.stop_reason,
                "warnings": list(self.warnings),
            },
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
        return PGD(
            self.threat, steps=steps, step_size=2.5 * self.threat.eps / steps, seed=self.config.seed
        )

    def test_attack(self) -> PGD:
        """The PGD that measures the kept model on the test split (40 steps)."""
        return PGD(
            self.threat, steps=40, step_size=2.5 * self.threat.eps / 40, seed=self.config.seed
        )

    # ------------------------------------------------------------------ the method
    def _build_method(self, threat: ThreatModel) -> LossFn:
        cfg = self.config
        return make_method(
            cfg.method,
            threat,
            steps=cfg.attack_steps,
            step_size=cfg.attack_step_size,
            **cfg.method_options,
        )

    def _mixed(self, loss_fn: LossFn) -> LossFn:
        if self.config.adv_ratio == 1:
            return loss_fn
        return _mix(loss_fn, self.config.adv_ratio)

    def _set_eps(self, eps: float) -> None:
        """Rebuild the method for a new eps (warm-up), carrying its state over."""
        if eps == self._loss_eps:
            return
        fresh = self._build_method(self.threat.replace(eps=eps))
        _transfer_method_state(self._base_loss, fresh)
        self._base_loss, self._loss_eps = fresh, eps
        self.loss_fn = self._mixed(fresh)

    def _epoch_hook(self, epoch: int) -> None:
        hook = getattr(self._base_loss, "on_epoch_start", None)
        if callable(hook):
            hook(self.model, epoch, self.run_epochs)

    # ------------------------------------------------------------------ one epoch
    def _epoch(self, epoch: int, generator: torch.Generator) -> EpochRecord:
        cfg = self.config
        start = time.perf_counter()
        n, size, batches = len(self.data.train), cfg.batch_size, self.batches_per_epoch
        partial, self._partial = self._partial, None
        self._epoch_hook(epoch)
        if partial is None:
            order = torch.randperm(n, generator=generator)
            done, total_loss, total_correct, seen = 0, 0.0, 0, 0
        else:
            order, done, total_loss, total_correct, seen = partial
        self.model.train()
        with _bar(self.progress, f"epoch {epoch}/{self.run_epochs}", batches, done) as advance:
            for batch in range(done, batches):
                index = order[batch * size : (batch + 1) * size]
                x, y = self._fetch(index)
                if self.augment is not None:  # the whole batch, so every rank draws alike
                    x = self.augment(x, generator)
                batch_rows = len(y)
                if self.sync_batchnorm and batch_rows < self.world:
                    done = batch + 1  # a rank without rows could not join the statistics
                    continue
                if self.world > 1:  # this rank's share: rows rank, rank + world, ...
                    x, y = x[self.rank :: self.world], y[self.rank :: self.world]
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                self._set_eps(
                    warmup_eps(
                        self.threat.eps, epoch, batch, batches, cfg.eps_warmup_epochs, self.replays
                    )
                )
                for _ in range(self.replays):
                    multiplier = self.schedule(self.global_step + 0.5, self.total_steps)
                    for group in self.optimizer.param_groups:
                        group["lr"] = cfg.lr * multiplier
                    loss, logits = self._step(x, y, batch_rows)
                    self.global_step += 1
                    # summed on the device: read back for the bar and the checkpoints only
                    total_loss = total_loss + loss.detach().double() * len(y)
                    total_correct = total_correct + (logits.detach().argmax(1) == y).sum()
                    seen += len(y)
                advance(
                    lambda: (
                        f"loss {float(total_loss) / max(seen, 1):.4f}  "
                        f"acc {int(total_correct) / max(seen, 1):.2%}"
                    )
                )
                done = batch + 1
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < batches:
                    self._save_resume(
                        epoch, done, order, (float(total_loss), int(total_correct), seen)
                    )
        total_loss, total_correct = float(total_loss), int(total_correct)
        if self.world > 1:
            total_loss, total_correct, seen = distributed.sum_over_ranks(
                [total_loss, total_correct, seen], self.device
            )
        clean, robust = self._validate()
        return EpochRecord(
            epoch=epoch,
            train_loss=total_loss / max(seen, 1),
            train_accuracy=total_correct / max(seen, 1),
            val_clean_accuracy=clean,
            val_robust_accuracy=robust,
            lr=self.optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - start,
            eps=self._loss_eps,
        )

    def _step(self, x: Tensor, y: Tensor, batch_rows: int | None = None) -> tuple[Tensor, Tensor]:
        """One optimiser step on this rank's rows ``x, y`` of a batch of ``batch_rows``."""
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        if len(y):
            with autocast:
                loss, logits = self.loss_fn(self.train_model, x, y)
        else:  # a last batch smaller than the world: this rank only adds zeros
            loss = torch.zeros((), device=self.device)
            logits = torch.zeros(0, self.data.info.n_classes, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        if len(y):
            # this rank's share of the batch's mean loss; the ranks' gradients are then summed
            share = loss if not batch_rows or batch_rows == len(y) else loss * (len(y) / batch_rows)
            (self.scaler.scale(share) if self.scaler is not None else share).backward()
        self._reduce()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.average is not None:
            self.average.update()
        return loss, logits

    def _reduce(self) -> None:
        if self.world > 1:
            distributed.sum_gradients(self.model)

    def _fetch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The training rows ``index`` on the device (through pinned memory on CUDA)."""
        x, y = self.data.train.x[index], self.data.train.y[index]
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    @property
    def kept_model(self) -> nn.Module:
        """The weights a run validates, keeps and saves: the average when there is one."""
        return self.model if self.average is None else self.average.module

    def _validate(self) -> tuple[float, float]:
        """Clean and PGD accuracy on the validation split."""
        return self._measure(self.data.val, self.validation_attack(), self.kept_model)

    def _measure(self, split: Split, attack: PGD, model: nn.Module) -> tuple[float, float]:
        """Clean and robust accuracy of ``model`` on ``split``, measured by rank 0 and shared
        with the other ranks (which hold the same weights)."""
        clean = robust = 0.0
        if self.rank == 0:
            found = clean_and_robust_accuracy(
                model,
                split.x.to(self.device),
                split.y.to(self.device),
                attack,
                batch_size=self.config.eval_batch_size,
            )
            clean, robust = found.clean_accuracy, found.robust_accuracy
        if self.world > 1:
            clean, robust = distributed.from_rank_zero([clean, robust], self.device)
        return clean, robust

    def _finish_epoch(self, record: EpochRecord, writer: Any) -> None:
        """Bookkeeping after an epoch: best epoch, files, log line, stop rules, checkpoint."""
        cfg = self.config
        epoch = record.epoch
        self.history.append(record)
        key = self._selection_key(record)
        if self.best_key is None or key > self.best_key:
            self.best_key, self.best_epoch = key, epoch
            self.best_state = _state_copy(self.kept_model)
            self._save(BEST, record)
        self._save(LAST, record)
        self._append_metrics(record)
        if writer is not None:
            for tag, value in (
                ("loss/train", record.train_loss),
                ("accuracy/train", record.train_accuracy),
                ("accuracy/val_clean", record.val_clean_accuracy),
                ("accuracy/val_robust", record.val_robust_accuracy),
                ("lr", record.lr),
                ("eps", record.eps),
            ):
                writer.add_scalar(tag, value, epoch)
            writer.flush()
        extra = ""
        if cfg.schedule != "constant":
            extra += f"  lr {record.lr:.3g}"
        if record.eps != self.threat.eps:
            extra += f"  eps {record.eps:.4g}"
        self.log(
            f"epoch {epoch:>3}/{self.run_epochs}  loss {record.train_loss:.4f}  "
            f"val clean {record.val_clean_accuracy:.2%}  val robust {record.val_robust_accuracy:.2%}"
            f"{extra}  ({record.seconds:.1f}s)"
        )
        self._check_stop(epoch)
        self._draw_curves(final=self.stop_reason is not None or epoch >= self.run_epochs)
        self._next_epoch = epoch + 1
        self._save_resume(epoch + 1, 0, None, None)

    def _check_stop(self, epoch: int) -> None:
        cfg = self.config
        if self.catastrophic != "off":
            message = catastrophic_overfitting(self.history, cfg.co_threshold)
            if message is not None and self.catastrophic == "stop":
                self.stop_reason = f"{message}; stopping, keeping epoch {self.best_epoch}"
            elif message is not None:
                self.warnings.append(message)
                self.log(f"warning: {message}")
        if (
            self.stop_reason is None
            and cfg.early_stop is not None
            and epoch < self.run_epochs
            and epoch - self.best_epoch >= cfg.early_stop
        ):
            self.stop_reason = (
                f"early stop after epoch {epoch}: no better validation accuracy for "
                f"{cfg.early_stop} epoch(s) since epoch {self.best_epoch}, which is kept"
            )
        if self.stop_reason is not None:
            self.log(self.stop_reason)

    # ------------------------------------------------------------------ run state
    def _reset_state(self) -> None:
        self.history: list[EpochRecord] = []
        self.best_key: tuple[float, float] | None = None
        self.best_epoch = 0
        self.best_state: dict[str, Tensor] | None = None
        self.global_step = 0
        self.stop_reason: str | None = None
        self.warnings: list[str] = []
        self._next_epoch = 1
        self._partial: tuple[Tensor, int, float, int, int] | None = None
        self._serial = 0
        self._curves_due = 0.0
        decay = self.config.weight_averaging_decay
        self.average = WeightAverage(self.model, decay) if decay else None

    def _start_fresh(self) -> None:
        self._reset_state()
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for slot in RESUME_SLOTS:  # a previous run's checkpoints must not be resumed into this one
            for path in (self.run_dir / slot, (self.run_dir / slot).with_suffix(".json")):
                path.unlink(missing_ok=True)
        atomic_write_json(self.run_dir / "config.json", self.config.to_dict())
        (self.run_dir / "metrics.jsonl").write_text("")

    def _open_writer(self, resumed: bool) -> Any:
        if self._writer_class is None or self.run_dir is None:
            return None
        return self._writer_class(
            log_dir=str(self.run_dir / "tensorboard"),
            purge_step=self._next_epoch if resumed else None,
        )

    # ------------------------------------------------------------------ files
    def _save(self, name: str, record: EpochRecord) -> None:
        if self.run_dir is None:
            return
        info = self.data.info
        meta = {
            "model": self.config.model,
            "dataset": info.name,
            "in_shape": list(info.shape),
            "n_classes": info.n_classes,
            "norm": self.threat.norm,
            "eps": self.threat.eps,
            "method": self.config.method,
            **record.to_dict(),
        }
        save_checkpoint(self.run_dir / name, self.kept_model.state_dict(), meta)

    def _append_metrics(self, record: EpochRecord) -> None:
        if self.run_dir is None:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record.to_dict(), sort_keys=True) + "\n")

    def _draw_curves(self, final: bool) -> None:
        """Redraw curves.png: after the last epoch always, after others unless epochs are so short
        that drawing would take more than a tenth of the time (it costs a fraction of a second)."""
        if self.run_dir is None or (not final and time.perf_counter() < self._curves_due):
            return
        from .curves import write_curves

        started = time.perf_counter()
        try:
            write_curves([r.to_dict() for r in self.history], self.run_dir / CURVES)
        except Exception as exc:  # a figure is never worth a training run
            self.log(f"warning: could not draw {CURVES}: {one_line(exc, 120)}")
        now = time.perf_counter()
        self._curves_due = now + CURVES_BUDGET * (now - started)

    # ------------------------------------------------------------------ checkpoints to resume from
    def _save_resume(
        self,
        next_epoch: int,
        next_batch: int,
        order: Tensor | None,
        totals: tuple[float, int, int] | None,
    ) -> None:
        """Write everything needed to go on from batch ``next_batch`` of epoch ``next_epoch``."""
        # every rank's own random state (its random starts), method state (e.g. the perturbation
        # `free` carries) and running totals of the epoch, gathered by rank 0
        ranks: list[Any] = []
        if self.world > 1:
            own: dict[str, Tensor] = {}
            own_meta = _save_method_state(self._base_loss, own)
            ranks = distributed.gathered_objects(
                (torch.get_rng_state(), {k: v.cpu() for k, v in own.items()}, own_meta, totals)
            )
        if self.run_dir is None:
            return
        self._serial += 1
        tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.best_state is not None:
            tensors.update({f"best.{k}": v for k, v in self.best_state.items()})
        if self.average is not None:
            tensors.update({f"average.{k}": v for k, v in self.average.state_dict().items()})
        optimizer = self.optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, state in optimizer["state"].items():
            for name, value in state.items():
                if isinstance(value, Tensor):
                    tensors[f"optim.{index}.{name}"] = value
                else:
                    scalars.setdefault(str(index), {})[name] = value
        tensors["rng.torch"] = torch.get_rng_state()
        for rank, (state, method_tensors, _, _) in enumerate(ranks):
            tensors[f"rng.torch.rank{rank}"] = state
            tensors.update({f"ranks.{rank}.{k}": v for k, v in method_tensors.items()})  # method.*
        tensors["rng.batches"] = self.generator.get_state()
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        for i, state in enumerate(cuda_states):
            tensors[f"rng.cuda.{i}"] = state
        if order is not None:
            tensors["epoch.order"] = order
        meta = {
            "kind": RESUME_KIND,
            "serial": self._serial,
            "config": self.config.to_dict(),
            "next_epoch": next_epoch,
            "next_batch": next_batch,
            "epoch_totals": list(totals) if totals is not None else None,
            "global_step": self.global_step,
            "cuda_rng_states": len(cuda_states),
            "average_updates": self.average.updates if self.average is not None else None,
            "history": [r.to_dict() for r in self.history],
            "best_epoch": self.best_epoch,
            "best_key": list(self.best_key) if self.best_key is not None else None,
            "stop_reason": self.stop_reason,
            "warnings": self.warnings,
            "optimizer": {"param_groups": optimizer["param_groups"], "scalars": scalars},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "method_state": _save_method_state(self._base_loss, tensors),
            "ranks": [
                {"method_state": m, "epoch_totals": list(t) if t is not None else None}
                for _, _, m, t in ranks
            ],
        }
        save_checkpoint(self.run_dir / RESUME_SLOTS[self._serial % 2], tensors, meta)

    def _read_resume(self) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The newest intact resume checkpoint of ``run_dir`` (None: none yet)."""
        if self.source_dir is None:
            raise AdvtrainError("resuming needs a run directory")
        source = self.source_dir
        path = source / "config.json"
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AdvtrainError(
                f"cannot resume: '{path}' is missing (not an advtrain run directory)"
            ) from None
        except (ValueError, UnicodeDecodeError):
            raise AdvtrainError(f"cannot resume: '{path}' is not valid JSON") from None
        differences = _config_differences(saved, self.config)
        if differences:
            raise AdvtrainError(
                f"cannot resume {source}: the configuration differs from its "
                f"config.json in {differences}"
            )
        newest: tuple[dict[str, Tensor], dict[str, Any]] | None = None
        for slot in RESUME_SLOTS:
            if not (source / slot).exists():
                continue
            try:
                tensors, meta = load_checkpoint(source / slot)
            except CheckpointError as exc:  # torn by a kill while it was written: the other one
                self.log(f"skipping {slot}: {exc}")
                continue
            if meta.get("kind") != RESUME_KIND:
                continue
            if newest is None or meta["serial"] > newest[1]["serial"]:
                newest = (tensors, meta)
        if newest is None:
            self.log(f"no checkpoint in {source} yet: starting from the beginning")
            return None
        differences = _config_differences(newest[1]["config"], self.config)
        if differences:
            raise AdvtrainError(
                f"cannot resume {source}: its checkpoint was written with "
                f"another configuration ({differences})"
            )
        return newest

    def _restore(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Put the trainer back in the state :meth:`_save_resume` recorded."""
        self._reset_state()

        def take(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        try:
            self.model.load_state_dict(take("model."))
            best = take("best.")
            self.best_state = {k: v.to(self.device) for k, v in best.items()} if best else None
            if self.average is not None:
                self.average.load_state_dict(take("average."), meta["average_updates"])
            self.optimizer.load_state_dict(self._optimizer_state(take("optim."), meta["optimizer"]))
            if self.scaler is not None and meta.get("scaler"):
                self.scaler.load_state_dict(meta["scaler"])
            torch.set_rng_state(tensors.get(f"rng.torch.rank{self.rank}", tensors["rng.torch"]))
            self.generator.set_state(tensors["rng.batches"])
            cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(meta["cuda_rng_states"])]
            if (
                cuda_states
                and torch.cuda.is_available()
                and len(cuda_states) == torch.cuda.device_count()
            ):
                torch.cuda.set_rng_state_all(cuda_states)
            self.history = [EpochRecord(**r) for r in meta["history"]]
            self.best_epoch = meta["best_epoch"]
            self.best_key = tuple(meta["best_key"]) if meta["best_key"] is not None else None
            self.global_step = meta["global_step"]
            self.stop_reason = meta["stop_reason"]
            self.warnings = list(meta["warnings"])
            self._serial = meta["serial"]
            self._next_epoch = meta["next_epoch"]
            # this rank's own state when the checkpoint has it (same number of ranks), else
            # rank 0's (totals: rank 0 only, the other ranks' rows then left out of the epoch's)
            own = meta.get("ranks") or []
            own = own[self.rank] if len(own) == self.world else None
            if meta["next_batch"]:
                totals = (
                    own["epoch_totals"]
                    if own is not None
                    else meta["epoch_totals"]
                    if self.rank == 0
                    else (0, 0, 0)
                )
                total_loss, total_correct, seen = totals
                self._partial = (
                    tensors["epoch.order"],
                    meta["next_batch"],
                    total_loss,
                    total_correct,
                    seen,
                )
            if own is not None:
                _load_method_state(
                    self._base_loss,
                    take(f"ranks.{self.rank}.method."),
                    own["method_state"],
                    self.model,
                    self.device,
                )
            else:
                _load_method_state(
                    self._base_loss, take("method."), meta["method_state"], self.model, self.device
                )
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"cannot resume {self.source_dir}: its checkpoint does not fit "
                f"this run ({type(exc).__name__}: {one_line(exc, 120)})"
            ) from None
        if self.run_dir is not None:
            # metrics.jsonl may hold epochs done after the checkpoint: they will be done again
            atomic_write_text(
                self.run_dir / "metrics.jsonl",
                "".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in self.history),
            )
        where = (
            f"epoch {self._next_epoch}, batch {meta['next_batch']}"
            if meta["next_batch"]
            else f"the start of epoch {self._next_epoch}"
        )
        self.log(f"resuming {self.run_dir} at {where} (optimizer step {self.global_step})")

    def _optimizer_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        for index, scalars in meta["scalars"].items():
            state.setdefault(int(index), {}).update(scalars)
        groups = []
        for saved, current in zip(meta["param_groups"], self.optimizer.param_groups):
            group = dict(saved)
            for key, value in group.items():  # JSON turned tuples (Adam's betas) into lists
                if isinstance(current.get(key), tuple) and isinstance(value, list):
                    group[key] = tuple(value)
            groups.append(group)
        return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------- method state


def _stateful(loss_fn: object) -> bool:
    return not isinstance(loss_fn, (types.FunctionType, types.BuiltinFunctionType)) and hasattr(
        loss_fn, "__dict__"
    )


def _has_state_dict(loss_fn: object) -> bool:
    return callable(getattr(loss_fn, "state_dict", None)) and callable(
        getattr(loss_fn, "load_state_dict", None)
    )


def _save_method_state(loss_fn: object, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Add the state a method keeps between batches to ``tensors``; describe it for the sidecar."""
    if _has_state_dict(loss_fn):
        for key, value in loss_fn.state_dict().items():  # type: ignore[attr-defined]
            tensors[f"method.{key}"] = value
        return {"kind": "state_dict"}
    if not _stateful(loss_fn):
        return {"kind": "none"}
    entries: dict[str, dict[str, Any]] = {}
    for name, value in vars(loss_fn).items():
        if isinstance(value, nn.Module):
            for key, item in value.state_dict().items():
                tensors[f"method.{name}.{key}"] = item
            entries[name] = {
                "type": "module",
                "training": value.training,
                "requires_grad": [p.requires_grad for p in value.parameters()],
            }
        elif isinstance(value, Tensor):
            tensors[f"method.{name}"] = value.detach()
            if value.grad is not None:
                tensors[f"method.{name}.grad"] = value.grad.detach()
            entries[name] = {
                "type": "tensor",
                "requires_grad": value.requires_grad,
                "grad": value.grad is not None,
            }
        elif value is None:
            entries[name] = {"type": "none"}
    return {"kind": "attributes", "entries": entries}


def _load_method_state(
    loss_fn: object,
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    model: nn.Module,
    device: torch.device,
) -> None:
    if meta["kind"] == "state_dict":
        loss_fn.load_state_dict(tensors)  # type: ignore[attr-defined]
        return
    if meta["kind"] != "attributes":
        return
    for name, entry in meta["entries"].items():
        if entry["type"] == "none":
            setattr(loss_fn, name, None)
        elif entry["type"] == "tensor":
            value = tensors[name].to(device)
            if entry["requires_grad"]:
                value.requires_grad_(True)
            if entry["grad"]:
                value.grad = tensors[f"{name}.grad"].to(device)
            setattr(loss_fn, name, value)
        elif entry["type"] == "module":
            module = getattr(loss_fn, name, None)
            if not isinstance(module, nn.Module):  # e.g. a teacher: a copy of the model
                module = copy.deepcopy(model)
            prefix = f"{name}."
            module.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
            module.train(entry["training"])
            for parameter, flag in zip(module.parameters(), entry["requires_grad"]):
                parameter.requires_grad_(flag)
            setattr(loss_fn, name, module)


def _transfer_method_state(old: object, new: object) -> None:
    """Carry a method's state over to the same method rebuilt for another eps."""
    if _has_state_dict(old) and _has_state_dict(new):
        new.load_state_dict(old.state_dict())  # type: ignore[attr-defined]
        return
    if not (_stateful(old) and _stateful(new)):
        return
    for name, value in vars(old).items():
        if isinstance(value, (Tensor, nn.Module)) or value is None:
            setattr(new, name, value)


def _config_differences(saved: dict[str, Any], config: TrainConfig) -> str:
    """The keys (other than ``out``) where ``saved`` (a config.json) and ``config`` differ."""
    try:
        reference = TrainConfig(**{k: v for k, v in saved.items() if k in config.to_dict()})
    except (AdvtrainError, TypeError) as exc:
        return f"a config.json this version cannot read ({one_line(exc, 120)})"
    ours, theirs = config.to_dict(), reference.to_dict()
    differing = [
        f"{key} ({theirs[key]!r} in the run, {ours[key]!r} here)"
        for key in ours
        if key != "out" and ours[key] != theirs[key]
    ]
    return ", ".join(differing)


# ---------------------------------------------------------------------- small helpers


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


#: The training bar shows the running loss and accuracy every this many batches.
BAR_REFRESH = 10


def _state_copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _bar:
    """A rich progress bar, or nothing, used as ``with _bar(...) as advance: advance(text)``.

    ``text`` is a function, called for every :data:`BAR_REFRESH`-th batch and the last one only:
    its figures are read back from the device, which makes the host wait for it.
    """

    def __init__(self, enabled: bool, label: str, total: int, completed: int = 0) -> None:
        self.enabled, self.label, self.total, self.completed = enabled, label, total, completed
        self.progress: Progress | None = None

    def __enter__(self) -> Callable[[Callable[[], str]], None]:
        console = Console(stderr=True)
        if not self.enabled or not console.is_terminal:
            return lambda text: None
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            transient=True,
            console=console,
        )
        self.progress.start()
        task = self.progress.add_task(
            self.label, total=self.total, completed=self.completed, status=""
        )
        progress, count = self.progress, [self.completed]

        def advance(text: Callable[[], str]) -> None:
            count[0] += 1
            if count[0] % BAR_REFRESH == 0 or count[0] == self.total:
                progress.update(task, advance=1, status=text())
            else:
                progress.update(task, advance=1)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
