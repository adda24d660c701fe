"""``run_sweep``: a search over training settings on Optuna, its front, and that front measured
on the test split with an evaluation suite.

A sweep runs trials (:mod:`.trial`) in an Optuna study (:mod:`.study`), then reads the study
back, whichever workers ran its trials: the trials, the validation front (non-dominated in clean
and robust validation accuracy among the trials that meet ``min_clean``,
:func:`.front.pareto_front`),
that front re-measured on the test split with the evaluation suite (``standard`` by default,
AutoAttack's recipe; each report is written beside its run as ``report.json``, which
``advtrain check`` takes as a baseline), and the recommendations: the test front, and the pick
(the most robust on the test split with clean accuracy >= ``min_clean``, or without a
constraint the best harmonic mean of the two).

The constraint ``clean >= min_clean`` is Optuna's own, not a penalty on the objective: each
trial sets ``min_clean - clean`` with ``Trial.set_constraint`` (Optuna 5; before it, the
sampler's ``constraints_func`` reads the same value), and TPE and NSGA-II rank infeasible trials
after feasible ones, with two objectives or one; the front and the pick take feasible trials
only (every trial when none is feasible, which the result's note says).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdvtrainError
from ..util import atomic_write_json, atomic_write_text, one_line
from . import study as optuna_study
from .evaluate_front import evaluate_trial
from .front import pareto_front
from .space import SearchSpace
from .trial import PRUNED_AT, RUN_DIR, VAL_CLEAN, VAL_ROBUST, train_trial


@dataclass
class TrialSummary:
    """One trial as the study records it, with its test-split figures when it was evaluated."""

    number: int
    state: str
    params: dict[str, Any]
    val_clean: float | None
    val_robust: float | None
    run_dir: str | None
    seconds: float | None
    pruned_at: int | None = None
    error: str | None = None
    feasible: bool = True
    test: dict[str, Any] | None = None


@dataclass
class SweepResult:
    """What :func:`run_sweep` found.

    ``front``: the trial numbers of the validation front; ``test_front``: those of the front
    re-measured on the test split; ``pick``: the recommended trial (see the module docstring).
    """

    study: str
    storage: str
    directory: str
    objectives: list[str]
    min_clean: float | None
    eval_eps: float | None
    suite: str | None
    space: dict[str, Any]
    trials: list[TrialSummary]
    front: list[int]
    test_front: list[int] = field(default_factory=list)
    pick: int | None = None
    note: str | None = None
    seconds: float = 0.0

    def trial(self, number: int) -> TrialSummary:
        return next(t for t in self.trials if t.number == number)

    def counts(self) -> dict[str, int]:
        """Trials per state (``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING``...)."""
        found: dict[str, int] = {}
        for trial in self.trials:
            found[trial.state] = found.get(trial.state, 0) + 1
        return found

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    def to_json(self, path: str | Path) -> Path:
        atomic_write_json(path, self.to_dict())
        return Path(path)

    def to_html(self, path: str | Path) -> Path:
        from .page import render_sweep

        atomic_write_text(path, render_sweep(self))
        return Path(path)


def run_sweep(
    space: SearchSpace,
    out: str | Path,
    *,
    trials: int = 10,
    timeout: float | None = None,
    storage: str | None = None,
    study: str = optuna_study.DEFAULT_STUDY,
    sampler: str | Any | None = None,
    pruner: str | Any | None = None,
    seed: int | None = None,
    max_trials: int | None = None,
    evaluate: bool = True,
    suite: str = "standard",
    test_limit: int | None = None,
    device: str | None = None,
    enqueue: list[dict[str, Any]] | None = None,
    log: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run ``trials`` trials of ``space`` in the study ``study`` (this worker's share), then
    summarise the whole study and, with ``evaluate``, measure its front on the test split.

    Args:
        space: the search space (:func:`advtrain.tuning.load_space`).
        out: the sweep directory: ``trials/trial-NNNN`` run directories, ``sweep.db`` (the
            default storage), and what the caller writes (``sweep.json``, ``sweep.html``).
        trials: trials this call runs (0: only summarise and evaluate the study as it is).
        timeout: seconds after which no new trial starts (Optuna's ``optimize(timeout=...)``).
        storage: an Optuna RDB URL (default: SQLite ``out/sweep.db``); workers given the same
            URL and ``study`` share the study.
        sampler, pruner: a name (:data:`.study.SAMPLERS`, :data:`.study.PRUNERS`) or an Optuna
            object; defaults: the space's, else ``tpe``, and ``median`` with one objective,
            ``none`` with two (Optuna prunes single-objective studies only).
        seed: the sampler's seed (None: Optuna's random one; give each worker its own).
        max_trials: stop once the study holds this many finished trials, whichever worker ran
            them (Optuna's ``MaxTrialsCallback``).
        evaluate: re-measure the validation front on the test split.
        suite: the evaluation suite for that (``quick``, ``standard``, ``thorough``).
        test_limit: evaluate on the first ``test_limit`` test points only.
        device: overrides every trial's device (and the evaluation's).
        enqueue: settings (searched keys to values) to try first, e.g. a hand-picked default
            to compare the front with (Optuna's ``enqueue_trial``; skipped when the study
            already holds a trial with the same settings).
        log: called with one line per trial and per evaluation.
    """
    optuna = optuna_study.require_optuna()
    say = log or (lambda line: None)
    if not isinstance(trials, int) or trials < 0:
        raise AdvtrainError(f"trials must be an integer >= 0, got {trials!r}")
    if timeout is not None and timeout <= 0:
        raise AdvtrainError(f"timeout must be > 0 seconds, got {timeout!r}")
    started = time.perf_counter()
    sweep_dir = Path(out)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    url = storage or optuna_study.default_storage(sweep_dir)
    multi = len(space.objectives) > 1
    # the clean-accuracy constraint: set by each trial where Optuna has Trial.set_constraint
    # (5.0 on), else Optuna's older constraints_func reading the trial's clean figure
    own_constraint = hasattr(optuna.trial.Trial, "set_constraint")
    constraints = (
        None if space.min_clean is None or own_constraint else _constraint(space.min_clean)
    )
    sampler_obj = sampler
    if sampler is None or isinstance(sampler, str):
        sampler_obj = optuna_study.make_sampler(
            sampler or space.sampler or "tpe", seed, constraints
        )
    pruner_name = pruner if isinstance(pruner, str) or pruner is None else None
    pruner_obj = pruner
    if pruner is None or isinstance(pruner, str):
        name = pruner or space.pruner or ("none" if multi else "median")
        pruner_obj = optuna_study.make_pruner(name, len(space.objectives))
        pruner_name = name
    prune = pruner_name != "none" and not multi
    store = optuna_study.open_storage(url)
    the_study = optuna_study.load_or_create_study(
        store,
        study,
        ["maximize"] * len(space.objectives),
        sampler_obj,
        pruner_obj,
        _stored_space(space),
    )

    for values in enqueue or []:
        the_study.enqueue_trial(values, skip_if_exists=True)

    def objective(trial: Any) -> float | tuple[float, float]:
        try:
            clean, robust = train_trial(
                trial, space, sweep_dir, prune=prune, log=say, device=device
            )
        except AdvtrainError as exc:
            trial.set_user_attr("error", one_line(exc, 300))
            raise
        return (clean, robust) if multi else robust

    def report(study_: Any, frozen: Any) -> None:
        clean, robust = frozen.user_attrs.get(VAL_CLEAN), frozen.user_attrs.get(VAL_ROBUST)
        figures = (
            f"val clean {clean:.2%} robust {robust:.2%}" if clean is not None else "no figures"
        )
        extra = frozen.user_attrs.get("error") or ""
        say(
            f"trial {frozen.number} {frozen.state.name.lower()}: {figures}  {frozen.params} {extra}"
        )

    callbacks: list[Any] = [report]
    if max_trials is not None:
        callbacks.append(
            optuna.study.MaxTrialsCallback(
                max_trials,
                states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED),
            )
        )
    if trials > 0:
        the_study.optimize(
            objective,
            n_trials=trials,
            timeout=timeout,
            callbacks=callbacks,
            catch=(AdvtrainError,),
            gc_after_trial=False,
        )
    result = summarise(the_study, space, url, sweep_dir)
    if evaluate:
        evaluate_front(result, space, suite=suite, test_limit=test_limit, device=device, log=say)
    result.seconds = time.perf_counter() - started
    return result


def _constraint(min_clean: float) -> Callable[[Any], list[float]]:
    """Optuna's ``constraints_func``: ``min_clean - clean`` (<= 0 is feasible); a trial without
    a clean figure counts as infeasible."""

    def constraint(frozen: Any) -> list[float]:
        clean = frozen.user_attrs.get(VAL_CLEAN)
        return [1.0 if clean is None else float(min_clean - clean)]

    return constraint


def _stored_space(space: SearchSpace) -> dict[str, Any]:
    """What the study remembers of the space (JSON-plain, to compare with a later worker's)."""
    data = {**space.to_dict(), "base": space.base.replace(out=".").to_dict()}
    return json.loads(json.dumps(data, default=str))


def summarise(the_study: Any, space: SearchSpace, url: str, sweep_dir: Path) -> SweepResult:
    """The study's trials and its validation front (see the module docstring)."""
    summaries = [
        _summary(frozen, space.min_clean) for frozen in the_study.get_trials(deepcopy=False)
    ]
    scored = [t for t in summaries if t.state == "COMPLETE" and t.val_clean is not None]
    feasible = [t for t in scored if t.feasible]
    note = None
    if scored and not feasible:
        note = (
            f"no trial reached clean validation accuracy {space.min_clean:.2%}: the front is "
            "taken over every trial"
        )
        feasible = scored
    points = [(float(t.val_clean or 0.0), float(t.val_robust or 0.0)) for t in feasible]
    front = [feasible[i].number for i in pareto_front(points)]
    return SweepResult(
        study=the_study.study_name,
        storage=optuna_study.shown_url(url),
        directory=str(sweep_dir),
        objectives=list(space.objectives),
        min_clean=space.min_clean,
        eval_eps=space.eval_eps,
        suite=None,
        space=space.to_dict(),
        trials=summaries,
        front=front,
        note=note,
    )


def _summary(frozen: Any, min_clean: float | None) -> TrialSummary:
    attrs = frozen.user_attrs
    clean = attrs.get(VAL_CLEAN)
    seconds = None if frozen.duration is None else frozen.duration.total_seconds()
    return TrialSummary(
        number=int(frozen.number),
        state=frozen.state.name,
        params=dict(frozen.params),
        val_clean=clean,
        val_robust=attrs.get(VAL_ROBUST),
        run_dir=attrs.get(RUN_DIR),
        seconds=seconds,
        pruned_at=attrs.get(PRUNED_AT),
        error=attrs.get("error"),
        feasible=min_clean is None or (clean is not None and clean >= min_clean),
    )


def evaluate_front(
    result: SweepResult,
    space: SearchSpace,
    *,
    suite: str,
    test_limit: int | None,
    device: str | None,
    log: Callable[[str], None],
) -> None:
    """Measure each trial of ``result.front`` on the test split with ``suite`` (its report goes
    to the run directory as ``report.json``), then set the test front and the pick."""
    result.suite = suite
    for number in result.front:
        trial = result.trial(number)
        if trial.run_dir is None:
            continue
        trial.test = evaluate_trial(
            Path(trial.run_dir), space, suite=suite, limit=test_limit, device=device
        )
        test = trial.test
        log(
            f"trial {number} on the test split ({suite} suite, n={test['n']}): clean "
            f"{test['clean']:.2%} robust {test['robust']:.2%}"
            + ("  MASKING SUSPECTED" if test["masking"] else "")
        )
    measured = [result.trial(n) for n in result.front if result.trial(n).test is not None]
    points = [(t.test["clean"], t.test["robust"]) for t in measured if t.test is not None]
    result.test_front = [measured[i].number for i in pareto_front(points)]
    result.pick = pick(measured, space.min_clean)


def pick(measured: list[TrialSummary], min_clean: float | None) -> int | None:
    """The recommended trial: the most robust on the test split among those with clean accuracy
    >= ``min_clean`` (ties: the cleaner); without a constraint (or none meeting it), the best
    harmonic mean of clean and robust accuracy. Trials with a masking verdict come last."""
    tested = [t for t in measured if t.test is not None]
    if not tested:
        return None
    honest = [t for t in tested if not t.test or not t.test["masking"]] or tested
    feasible = [
        t for t in honest if min_clean is not None and t.test and t.test["clean"] >= min_clean
    ]
    if feasible:
        best = max(
            feasible, key=lambda t: (t.test["robust"], t.test["clean"]) if t.test else (0, 0)
        )
        return best.number

    def harmonic(t: TrialSummary) -> float:
        assert t.test is not None
        c, r = t.test["clean"], t.test["robust"]
        return 0.0 if c + r <= 0 else 2 * c * r / (c + r)

    return max(honest, key=harmonic).number
