"""Optuna's pieces for a sweep: the study in its storage, the sampler, the pruner.

Everything here is Optuna's own (Akiba et al., KDD 2019): the study lives in an RDB storage
(SQLite in the sweep directory by default, or any SQLAlchemy URL Optuna accepts, which is how
several workers or machines share one study); samplers are TPE (Bergstra et al., NeurIPS 2011;
multi-objective and with constraints as Optuna implements them, ``n_startup_trials`` 10 random
trials first), NSGA-II (Deb et al., 2002) or random; pruners are the median rule, successive
halving (Jamieson & Talwalkar 2016) and Hyperband (Li et al. 2018) with Optuna's defaults.

Optuna is imported only when a sweep runs (the ``tune`` extra): without it every entry point
fails with one line naming the extra.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import AdvtrainError
from ..util import one_line

SAMPLERS = ("tpe", "nsga2", "random")
PRUNERS = ("median", "successive-halving", "hyperband", "none")
DEFAULT_STUDY = "advtrain-sweep"
DATABASE = "sweep.db"
#: NSGA-II's population for sweeps of tens of trials (Optuna's default, 50, would make a
#: 30-trial sweep one random generation).
NSGA2_POPULATION = 10
#: Seconds a worker waits for the SQLite file's lock, and how often and how long it retries
#: opening a storage that another worker is creating at the same moment.
SQLITE_TIMEOUT_S = 60
OPEN_RETRIES, OPEN_BACKOFF_S = 8, 0.25
#: RDB heartbeat: a trial whose worker has not beaten for the grace period is failed (and
#: retried, with its settings, in the same run directory) by the next worker to start a trial.
HEARTBEAT_S, GRACE_S, MAX_RETRY = 30, 120, 2


def require_optuna() -> ModuleType:
    """The ``optuna`` module, or a one-line error naming the extra that installs it."""
    try:
        import optuna
    except ImportError:
        raise AdvtrainError("advtrain sweep needs Optuna: pip install 'advtrain[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def default_storage(sweep_dir: Path) -> str:
    """The SQLite file in the sweep directory, as an Optuna storage URL."""
    return f"sqlite:///{(sweep_dir / DATABASE).resolve()}"


def shown_url(url: str) -> str:
    """``url`` with any password hidden, for logs and pages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: shown as given (it will fail to open anyway)
        return url


def open_storage(url: str) -> Any:
    """Optuna's RDB storage at ``url``, with a heartbeat (dead workers' trials are retried) and,
    for SQLite, a lock timeout; opening is retried while another worker creates the tables."""
    optuna = require_optuna()
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    last: Exception | None = None
    for attempt in range(OPEN_RETRIES):
        try:
            with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna's words
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    **_retry_callback(optuna),
                )
            if url.startswith("sqlite"):
                _immediate_transactions(storage.engine)
            return storage
        except ImportError as exc:  # a driver (psycopg2, pymysql) that is not installed
            raise AdvtrainError(f"storage {shown_url(url)}: {one_line(exc, 160)}") from None
        except Exception as exc:  # sqlalchemy's OperationalError: tables created concurrently
            if isinstance(exc, (ValueError, optuna.exceptions.StorageInternalError)) and (
                "locked" not in str(exc) and "exists" not in str(exc)
            ):
                raise AdvtrainError(
                    f"cannot open storage {shown_url(url)}: {one_line(exc, 160)}"
                ) from None
            last = exc
            time.sleep(OPEN_BACKOFF_S * (1 + attempt) * (0.5 + random.random()))
    raise AdvtrainError(f"cannot open storage {shown_url(url)}: {one_line(last, 160)}")


def _immediate_transactions(engine: Any) -> None:
    """Make every SQLite transaction of ``engine`` take the write lock when it begins.

    Python's sqlite3 driver begins a transaction only at the first write, so Optuna's "read the
    trial, then mark it running" (``SELECT ... FOR UPDATE`` elsewhere; SQLite has no row locks)
    is not atomic there: two workers starting together can both pop the same enqueued trial and
    train it twice into one run directory (seen with two and four workers). SQLAlchemy's recipe
    for pysqlite (its SQLite dialect documentation, "Serializable isolation / Savepoints /
    Transactional DDL"): let the driver issue no BEGIN itself and emit ``BEGIN IMMEDIATE`` at
    the start of each transaction. Workers then take turns on the file (each waits up to
    :data:`SQLITE_TIMEOUT_S`), which costs nothing beside a trial.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_driver_begin(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while the storage was created lack the first hook


def _retry_callback(optuna: ModuleType) -> dict[str, Any]:
    """Optuna's callback that re-queues a trial whose worker stopped beating, under the name
    the installed Optuna gives it (renamed in 4.9)."""
    storages = optuna.storages
    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
        callback = storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
        return {"heartbeat_stale_trial_callback": callback}
    return {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=MAX_RETRY)}


def make_sampler(
    name: str,
    seed: int | None,
    constraints: Callable[[Any], Sequence[float]] | None,
) -> Any:
    """Optuna's sampler ``name`` (:data:`SAMPLERS`), with the constraint function if any."""
    optuna = require_optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, constraints_func=constraints
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(
            population_size=NSGA2_POPULATION, seed=seed, constraints_func=constraints
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise AdvtrainError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


def make_pruner(name: str, objectives: int) -> Any:
    """Optuna's pruner ``name`` (:data:`PRUNERS`). Optuna prunes single-objective studies only
    (``Trial.report`` raises in a multi-objective one): with two objectives only ``none``."""
    optuna = require_optuna()
    if name not in PRUNERS:
        raise AdvtrainError(f"unknown pruner {name!r}; choose one of: {', '.join(PRUNERS)}")
    if name != "none" and objectives > 1:
        raise AdvtrainError(
            f"pruner {name!r} needs one objective: Optuna prunes single-objective studies only; "
            "use objectives ['robust'] (with min_clean) or pruner 'none'"
        )
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def load_or_create_study(
    storage: Any,
    name: str,
    directions: list[str],
    sampler: Any,
    pruner: Any,
    space: dict[str, Any],
) -> Any:
    """The study ``name`` in ``storage``, created if it does not exist (two workers starting at
    once both end up with the one study); refused when it was created for another space."""
    optuna = require_optuna()
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            directions=directions,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    except ValueError as exc:  # other directions than the stored study's
        raise AdvtrainError(f"study {name!r}: {one_line(exc, 200)}") from None
    stored = study.user_attrs.get("space")
    if stored is None:
        study.set_user_attr("space", space)
    elif stored != space:
        raise AdvtrainError(
            f"study {name!r} was created for another search space or objective; "
            "give another --study or --out"
        )
    return study
