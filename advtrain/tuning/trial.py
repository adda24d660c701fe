"""One sweep trial: sample its settings, train it as an ordinary run, report to Optuna.

The settings come from Optuna's ``trial.suggest_*`` calls (define-by-run: a setting with
``when`` is only suggested when the settings before it allow it). The run trains in its own
directory ``trials/trial-NNNN`` with the usual files, so it can be evaluated, compared or
resumed like any run. A trial that Optuna retries after its worker died (RDB storage's heartbeat
and its retry callback, which copies the trial's settings and user attributes) trains in the
directory of the trial it retries and resumes from its newest checkpoint.

Pruning follows the robust validation accuracy the trainer measures after every epoch: the
:class:`PruneOnRobust` observer reports it (``trial.report(value, epoch)``) and, when the pruner
says so (``trial.should_prune()``), ends the run after that epoch; the run keeps its best epoch
and its files, and the trial is marked pruned. Optuna supports ``report``/``should_prune`` only
in single-objective studies, so a two-objective sweep does not prune.

The objective values are the kept model's validation accuracies, clean and robust (the epoch
the run keeps is its most robust one on the validation split, see
:mod:`advtrain.training.observers`). Robust accuracy is measured at the sweep's one evaluation
radius (``eval_eps``) with the trainer's own validation PGD (``eval_steps`` steps of
``2.5 * eps / steps``, seeded with the run's seed): where a trial trains at that radius these are
the figures the trainer already records; where it trains at another, the same PGD runs again at
``eval_eps`` after each epoch (for pruning) and on the kept model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..attacks import PGD
from ..data import Dataset
from ..errors import AdvtrainError
from ..threat import ThreatModel
from ..training import TrainConfig, Trainer
from ..training.observers import EpochEnd, EpochObserver
from ..training.records import EpochRecord, RunState, TrainResult
from ..training.validation import measure
from .runs import fresh_model, load_data
from .space import Param, SearchSpace

#: Trial user attributes the sweep reads back.
VAL_CLEAN, VAL_ROBUST, RUN_DIR, PRUNED_AT = "val_clean", "val_robust", "run_dir", "pruned_at"


class RobustAtEval:
    """Robust validation accuracy at the sweep's radius: the record's own figure when the run
    trains at that radius, else the trainer's validation PGD run again at it."""

    def __init__(self, config: TrainConfig, data: Dataset, trained: ThreatModel, eps: float):
        self.same = abs(trained.eps - eps) <= 1e-12 * max(1.0, eps)
        self.target = data.info.threat_model(norm=config.norm, eps=eps)
        self.config, self.data = config, data

    def of(self, record: EpochRecord, model: nn.Module) -> float:
        if self.same:
            return float(record.val_robust_accuracy)
        steps = self.config.eval_steps
        attack = PGD(
            self.target, steps=steps, step_size=2.5 * self.target.eps / steps, seed=self.config.seed
        )
        device = next(model.parameters()).device
        x = self.data.val.x
        figures = measure(
            model,
            x.to(device) if hasattr(x, "to") else x,
            self.data.val.y.to(device),
            attack,
            self.config.eval_batch_size,
        )
        return float(figures.robust_accuracy)


class PruneOnRobust(EpochObserver):
    """Reports each epoch's robust validation accuracy (at the sweep's radius) to an Optuna trial
    and stops the run when its pruner says so (``pruned_at`` then holds the epoch)."""

    def __init__(self, trial: Any, robust: RobustAtEval, log: Callable[[str], None]) -> None:
        self.trial, self.robust, self.log = trial, robust, log
        self.pruned_at: int | None = None

    def start(self, run: RunState, resumed: bool) -> None:
        if self.robust.same:  # a resumed run: the epochs before its checkpoint
            for record in run.history:
                self.trial.report(float(record.val_robust_accuracy), record.epoch)

    def epoch_end(self, end: EpochEnd) -> None:
        epoch = end.record.epoch
        value = self.robust.of(end.record, end.kept_model)
        self.trial.report(value, epoch)
        if end.run.stop_reason is None and not end.final and self.trial.should_prune():
            self.pruned_at = epoch
            end.run.stop_reason = (
                f"pruned after epoch {epoch}: robust validation accuracy {value:.2%} "
                "(the sweep's pruner)"
            )
            self.log(end.run.stop_reason)


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """The trial's settings: each searched setting suggested in order, those whose ``when``
    the earlier ones rule out left at their fixed value."""
    chosen: dict[str, Any] = {}
    for param in space.params:
        context = {**space.base.to_dict(), **chosen}
        if param.applies(context):
            chosen[param.key] = _suggest_one(trial, param)
    return chosen


def _suggest_one(trial: Any, param: Param) -> Any:
    if param.choices is not None:
        return trial.suggest_categorical(param.key, list(param.choices))
    assert param.low is not None and param.high is not None
    if param.integer:
        step = 1 if param.step is None else int(param.step)
        return trial.suggest_int(
            param.key, int(param.low), int(param.high), step=step, log=param.log
        )
    return trial.suggest_float(param.key, param.low, param.high, step=param.step, log=param.log)


def run_dir_of(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / "trials" / f"trial-{number:04d}"


def train_trial(
    trial: Any,
    space: SearchSpace,
    sweep_dir: Path,
    *,
    prune: bool,
    log: Callable[[str], None],
    device: str | None = None,
) -> tuple[float, float]:
    """Train ``trial``'s configuration and return the kept epoch's (clean, robust) validation
    accuracy; raises ``optuna.TrialPruned`` when the pruner stopped it."""
    import optuna

    values = suggest(trial, space)
    # a retry of a trial whose worker died inherits its user attributes: its run directory
    run_dir = Path(trial.user_attrs.get(RUN_DIR) or run_dir_of(sweep_dir, trial.number))
    config = space.config(values, str(run_dir))
    if device is not None:
        config = config.replace(device=device)
    trial.set_user_attr(RUN_DIR, str(run_dir))
    resume = (run_dir / "config.json").is_file()
    run_dir.mkdir(parents=True, exist_ok=True)
    data = load_data(config)
    trainer = Trainer(fresh_model(config, data), data, config, run_dir, log=None)
    eps = eval_radius(space, data, config)
    robust_at = RobustAtEval(config, data, trainer.threat, eps)
    watch = PruneOnRobust(trial, robust_at, log) if prune else None
    if watch is not None:
        trainer.observers.insert(0, watch)
    if resume:
        log(f"trial {trial.number}: resuming {run_dir}")
    result = trainer.fit(resume=resume)
    kept = kept_record(result)
    clean, robust = float(kept.val_clean_accuracy), robust_at.of(kept, trainer.model)
    trial.set_user_attr(VAL_CLEAN, clean)
    if space.min_clean is not None and hasattr(trial, "set_constraint"):  # Optuna >= 5
        trial.set_constraint("min_clean", space.min_clean - clean)  # <= 0: feasible
    trial.set_user_attr(VAL_ROBUST, robust)
    trial.set_user_attr("epochs_run", len(result.history))
    if watch is not None and watch.pruned_at is not None:
        trial.set_user_attr(PRUNED_AT, watch.pruned_at)
        raise optuna.TrialPruned(f"pruned after epoch {watch.pruned_at}")
    return clean, robust


def eval_radius(space: SearchSpace, data: Dataset, config: TrainConfig) -> float:
    """The radius robust accuracy is measured at: the space's ``eval_eps``, else the dataset's."""
    if space.eval_eps is not None:
        return space.eval_eps
    return float(data.info.threat_model(norm=config.norm).eps)


def kept_record(result: TrainResult) -> EpochRecord:
    """The record of the epoch the run kept (its weights are the model's after ``fit``)."""
    kept = [r for r in result.history if r.epoch == result.best_epoch]
    if not kept:
        raise AdvtrainError("the run kept no epoch (no epoch was trained)")
    return kept[0]
