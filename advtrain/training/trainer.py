"""The training loop: one method's batch loss, validated for robustness after every epoch.

The run directory holds ``config.json`` (the resolved configuration), ``metrics.jsonl`` (one
line per epoch, with the learning rate and eps the epoch ended with), ``model.safetensors`` with
its JSON sidecar (the epoch with the best robust validation figure, Rice et al. 2020 having
shown robust overfitting: robust accuracy, or the positive class's robust recall or PR-AUC, see
``select_by``), ``last.safetensors`` (the latest epoch), ``curves.png`` (learning curves),
``summary.json`` (test figures of the kept model), optionally ``tensorboard/``, and
two resume checkpoints ``resume-0.safetensors`` / ``resume-1.safetensors`` with their sidecars
(see :mod:`advtrain.training.resume`).

The loop is here; the rest has its own module: the method (:mod:`~advtrain.training.method`),
the computing set-up (:mod:`~advtrain.training.runtime`), the order of an epoch's rows
(:mod:`~advtrain.training.sampling`: a shuffle or a class-balanced draw), what is measured after
each epoch (:mod:`~advtrain.training.validation`), what happens then
(:mod:`~advtrain.training.observers`: best epoch, files, log, stop rules, curves, TensorBoard)
and resuming (:mod:`~advtrain.training.resume`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import distributed
from ..attacks import PGD
from ..data import TABLE_ENCODING_FILE, Dataset
from ..data.base import Split
from ..util import atomic_write_json, atomic_write_text
from . import observers as obs
from .augment import make_augment
from .averaging import WeightAverage
from .config import FGSM_TYPE, TrainConfig
from .method import Method
from .methods import make_method, mix
from .progress import EpochBar
from .records import EpochRecord, RunState, TrainResult
from .resume import Partial, RankState, ResumeState, Totals, clear_slots, read_newest, unfit
from .runtime import make_optimizer, make_runtime
from .sampling import epoch_order
from .schedules import get_schedule, warmup_eps
from .validation import EpochFigures, measure

__all__ = ["EpochRecord", "TrainResult", "Trainer"]

#: Rank r > 0 of a distributed run seeds its own random draws with ``seed + r * stride``.
RANK_SEED_STRIDE = 7919


def _status(total_loss: Tensor | float, total_correct: Tensor | int, seen: int) -> str:
    """The progress bar's running loss and accuracy (read back from the device)."""
    return (
        f"loss {float(total_loss) / max(seen, 1):.4f}  acc {int(total_correct) / max(seen, 1):.2%}"
    )


class Trainer:
    """Train ``model`` on ``data`` with ``config``'s method, keeping the most robust epoch.

    Args:
        model: the network (returns logits).
        data: the dataset with its train, validation and test splits.
        config: the run's configuration.
        run_dir: where checkpoints and logs go (``None``: keep everything in memory).
        progress: show a progress bar per epoch.
        log: called with one line of text after each epoch (``None``: silent).

    The method (:class:`~advtrain.training.method.Method`) trains on each minibatch
    ``method.replays`` times, and ``ceil(epochs / replays)`` epochs run; its eps follows the
    warm-up; its state goes into the resume checkpoints. ``observers`` run after each epoch, in
    order (see :mod:`advtrain.training.observers`).
    """

    state: RunState
    average: WeightAverage | None
    _partial: Partial | None

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
        self.runtime = runtime = make_runtime(model, config, data.info)
        self.device, self.rank, self.world = runtime.device, runtime.rank, runtime.world
        self.amp_dtype, self.channels_last = runtime.amp_dtype, runtime.channels_last
        self.model, self.train_model = runtime.model, runtime.train_model
        self.scaler = runtime.scaler
        self.threat = data.info.threat_model(norm=config.norm, eps=config.eps)
        options = {"steps": config.attack_steps, "step_size": config.attack_step_size}
        method = make_method(config.method, self.threat, **options, **config.method_options)
        self.method: Method = method if config.adv_ratio == 1 else mix(method, config.adv_ratio)
        self.replays = self.method.replays
        self.run_epochs = math.ceil(config.epochs / self.replays)
        self.batches_per_epoch = math.ceil(len(data.train) / config.batch_size)
        self.total_steps = self.run_epochs * self.batches_per_epoch * self.replays
        self.schedule = get_schedule(config.schedule)
        self.augment = make_augment(config.augment, data.info, config.noise_std)
        self.catastrophic = config.catastrophic
        if self.catastrophic == "auto":
            self.catastrophic = "stop" if config.method in FGSM_TYPE else "off"
        self.optimizer = make_optimizer(self.model, config)
        self.positive_class = data.info.positive_class
        self.select_by = config.selection(self.positive_class, repr(data.info.name))
        # Every rank reads the run directory (resume); only rank 0 writes to it and speaks.
        self.source_dir = None if run_dir is None else Path(run_dir)
        self.run_dir = self.source_dir if self.rank == 0 else None
        self.progress = progress and self.rank == 0
        self.log: Callable[[str], None] = (log if self.rank == 0 else None) or (lambda line: None)
        self.observers = obs.standard_observers(
            config,
            data.info,
            self.threat,
            self.run_dir,
            self.log,
            self.catastrophic,
            self.select_by,
        )
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
        checkpoint = read_newest(self.source_dir, cfg, self.log) if resume else None
        if self.world > 1:  # every rank has read the run directory before rank 0 rewrites it
            distributed.barrier()
        if checkpoint is None:
            torch.manual_seed(cfg.seed)
            if self.rank > 0:  # random starts and noise of their own on each rank
                torch.manual_seed(cfg.seed + RANK_SEED_STRIDE * self.rank)
            self._start_fresh()
        else:
            self._restore(checkpoint)
        for observer in self.observers:
            observer.start(self.state, checkpoint is not None)
        try:
            while self.state.stop_reason is None and self.state.next_epoch <= self.run_epochs:
                record = self._epoch(self.state.next_epoch, self.generator)
                self._finish_epoch(record)
        finally:
            for observer in self.observers:
                observer.close()
        if self.state.best_state is not None:
            self.model.load_state_dict(self.state.best_state)
        elif self.average is not None:
            self.model.load_state_dict(self.average.state_dict())
        test_attack = self.test_attack()
        test = self._measure(self.data.test, test_attack, self.model)
        extra = {
            "test_attack": repr(test_attack),
            "eps": self.threat.eps,
            "norm": self.threat.norm,
            "epochs_run": len(self.state.history),
            "stop_reason": self.state.stop_reason,
            "warnings": list(self.state.warnings),
            "select_by": self.select_by,
            "class_weight": cfg.class_weight,
        }
        if self.positive_class is not None:
            extra["positive_class"] = self.positive_class
            extra.update({f"test_{k}": v for k, v in test.positive().items()})
        result = TrainResult(
            best_epoch=self.state.best_epoch,
            history=list(self.state.history),
            test_clean_accuracy=test.clean_accuracy,
            test_robust_accuracy=test.robust_accuracy,
            seconds=time.perf_counter() - start,
            extra=extra,
        )
        if self.run_dir is not None:
            atomic_write_json(self.run_dir / "summary.json", result.to_dict())
        return result

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

    @property
    def kept_model(self) -> nn.Module:
        """The weights a run validates, keeps and saves: the average when there is one."""
        return self.model if self.average is None else self.average.module

    # ------------------------------------------------------------------ one epoch
    def _epoch(self, epoch: int, generator: torch.Generator) -> EpochRecord:
        cfg = self.config
        start = time.perf_counter()
        size, batches = cfg.batch_size, self.batches_per_epoch
        partial, self._partial = self._partial, None
        self.method.on_epoch_start(self.model, epoch, self.run_epochs)
        total_loss: Tensor | float
        total_correct: Tensor | int
        if partial is None:
            order = epoch_order(self.data.train.y, cfg.class_weight, generator)
            done, total_loss, total_correct, seen = 0, 0.0, 0, 0
        else:
            order, done, total_loss, total_correct, seen = partial
        self.model.train()
        with EpochBar(self.progress, f"epoch {epoch}/{self.run_epochs}", batches, done) as advance:
            for batch in range(done, batches):
                x, y = self._fetch(order[batch * size : (batch + 1) * size])
                if self.augment is not None:  # the whole batch, so every rank draws alike
                    x = self.augment(x, generator)
                batch_rows = len(y)
                if self.runtime.sync_batchnorm and batch_rows < self.world:
                    done = batch + 1  # a rank without rows could not join the statistics
                    continue
                if self.world > 1:  # this rank's share: rows rank, rank + world, ...
                    x, y = x[self.rank :: self.world], y[self.rank :: self.world]
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                eps = warmup_eps(
                    self.threat.eps, epoch, batch, batches, cfg.eps_warmup_epochs, self.replays
                )
                if eps != self.method.eps:
                    self.method.set_eps(eps)
                for _ in range(self.replays):
                    multiplier = self.schedule(self.state.global_step + 0.5, self.total_steps)
                    for group in self.optimizer.param_groups:
                        group["lr"] = cfg.lr * multiplier
                    loss, logits = self._step(x, y, batch_rows)
                    self.state.global_step += 1
                    # summed on the device: read back for the bar and the checkpoints only
                    total_loss = total_loss + loss.detach().double() * len(y)
                    total_correct = total_correct + (logits.detach().argmax(1) == y).sum()
                    seen += len(y)
                advance(functools.partial(_status, total_loss, total_correct, seen))
                done = batch + 1
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < batches:
                    totals = (float(total_loss), int(total_correct), seen)
                    self._save_resume(epoch, done, order, totals)
        total_loss, total_correct = float(total_loss), int(total_correct)
        if self.world > 1:
            total_loss, summed_correct, seen_all = distributed.sum_over_ranks(
                [total_loss, total_correct, seen], self.device
            )
            total_correct, seen = int(summed_correct), int(seen_all)
        val = self._validate()
        return EpochRecord(
            epoch=epoch,
            train_loss=total_loss / max(seen, 1),
            train_accuracy=total_correct / max(seen, 1),
            val_clean_accuracy=val.clean_accuracy,
            val_robust_accuracy=val.robust_accuracy,
            lr=self.optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - start,
            eps=self.method.eps,
            **{f"val_{k}": v for k, v in val.positive().items()},
        )

    def _step(self, x: Tensor, y: Tensor, batch_rows: int | None = None) -> tuple[Tensor, Tensor]:
        """One optimiser step on this rank's rows ``x, y`` of a batch of ``batch_rows``."""
        if len(y):
            with self.runtime.autocast():
                loss, logits = self.method.loss(self.train_model, x, y)
        else:  # a last batch smaller than the world: this rank only adds zeros
            loss = torch.zeros((), device=self.device)
            logits = torch.zeros(0, self.data.info.n_classes, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        if len(y):
            # this rank's share of the batch's mean loss; the ranks' gradients are then summed
            share = loss if not batch_rows or batch_rows == len(y) else loss * (len(y) / batch_rows)
            (self.scaler.scale(share) if self.scaler is not None else share).backward()
        if self.world > 1:
            distributed.sum_gradients(self.model)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.average is not None:
            self.average.update()
        return loss, logits

    def _fetch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The training rows ``index`` on the device (through pinned memory on CUDA)."""
        x, y = self.data.train.x[index], self.data.train.y[index]
        if self.runtime.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _validate(self) -> EpochFigures:
        """Clean and PGD accuracy on the validation split (and the positive class's figures)."""
        return self._measure(self.data.val, self.validation_attack(), self.kept_model)

    def _measure(self, split: Split, attack: PGD, model: nn.Module) -> EpochFigures:
        """The figures of ``model`` on ``split`` (:func:`~advtrain.training.validation.measure`),
        measured by rank 0 and shared with the other ranks (which hold the same weights)."""
        found = EpochFigures(0.0, 0.0)
        if self.rank == 0:
            # inputs read on demand (an image folder) go to the device chunk by chunk
            x = split.x.to(self.device) if isinstance(split.x, Tensor) else split.x
            found = measure(
                model,
                x,
                split.y.to(self.device),
                attack,
                self.config.eval_batch_size,
                self.positive_class,
            )
        if self.world > 1:
            found = EpochFigures.from_list(distributed.from_rank_zero(found.as_list(), self.device))
        return found

    def _finish_epoch(self, record: EpochRecord) -> None:
        """After an epoch: its record, the observers (files, stop rules), a checkpoint."""
        self.state.history.append(record)
        end = obs.EpochEnd(record, self.state, self.kept_model, self.run_epochs)
        for observer in self.observers:
            observer.epoch_end(end)
        self.state.next_epoch = record.epoch + 1
        self._save_resume(record.epoch + 1, 0, None, None)

    # ------------------------------------------------------------------ run state
    def _reset_state(self) -> None:
        self.state = RunState()
        self._partial = None
        decay = self.config.weight_averaging_decay
        self.average = WeightAverage(self.model, decay) if decay else None

    def _start_fresh(self) -> None:
        self._reset_state()
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        clear_slots(self.run_dir)
        atomic_write_json(self.run_dir / "config.json", self.config.to_dict())
        encoding = self.data.info.encoding
        if encoding is not None:  # the preprocessing in front of the model, to read raw rows again
            atomic_write_json(self.run_dir / TABLE_ENCODING_FILE, encoding.to_json())
        (self.run_dir / "metrics.jsonl").write_text("")

    # ------------------------------------------------------------------ checkpoints to resume from
    def _save_resume(
        self, next_epoch: int, next_batch: int, order: Tensor | None, totals: Totals | None
    ) -> None:
        """Write everything needed to go on from batch ``next_batch`` of epoch ``next_epoch``."""
        ranks: list[RankState] = []
        if self.world > 1:  # every rank's own RNG, method state and totals, gathered by rank 0
            own = (torch.get_rng_state(), {k: v.cpu() for k, v in self.method.state_dict().items()})
            gathered = distributed.gathered_objects((*own, totals))
            ranks = [RankState(*item) for item in gathered]  # type: ignore[misc]  # 3-tuples
        if self.run_dir is None:
            return
        self.state.serial += 1
        ResumeState.capture(
            self.config,
            self.state,
            (next_epoch, next_batch, order, totals),
            self.model,
            self.optimizer,
            self.scaler,
            self.average,
            self.generator,
            self.method.state_dict(),
            ranks,
        ).write(self.run_dir)

    def _restore(self, checkpoint: ResumeState) -> None:
        """Put the trainer back in the state :meth:`_save_resume` recorded."""
        self._reset_state()
        try:
            checkpoint.restore_into(
                self.model, self.optimizer, self.scaler, self.average, self.generator, self.rank
            )
            self.state = checkpoint.run
            if self.state.best_state is not None:
                self.state.best_state = {
                    k: v.to(self.device) for k, v in self.state.best_state.items()
                }
            self._partial = checkpoint.partial_epoch(self.rank, self.world)
            method_state = checkpoint.method_state(self.rank, self.world)
            self.method.load_state_dict(
                {k: v.to(self.device) for k, v in method_state.items()}, self.model
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise unfit(self.source_dir, exc) from None
        if self.run_dir is not None:
            # metrics.jsonl may hold epochs done after the checkpoint: they will be done again
            atomic_write_text(
                self.run_dir / "metrics.jsonl",
                "".join(obs.json_line(r) for r in self.state.history),
            )
        where = (
            f"epoch {self.state.next_epoch}, batch {checkpoint.next_batch}"
            if checkpoint.next_batch
            else f"the start of epoch {self.state.next_epoch}"
        )
        self.log(f"resuming {self.run_dir} at {where} (optimizer step {self.state.global_step})")
