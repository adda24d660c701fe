"""A run's kept model measured on the test split with an evaluation suite: a sweep's trials
(:func:`evaluate_trial`), and a run measured as a baseline was (:func:`evaluate_like`).

The report (:func:`advtrain.evaluate`) is written to the run directory as ``report.json``, the
same file ``advtrain evaluate RUN --json`` writes, with the dataset named in its settings; a
report already there for the same suite, radius, norm and points is read instead of measured
again (a sweep summarised a second time, or by another worker, reuses it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import AdvtrainError
from ..evaluation import evaluate
from ..evaluation.report import Report
from .gate import masking_findings
from .runs import LoadedRun, load_run
from .space import SearchSpace

REPORT = "report.json"
#: Points per chunk of the evaluation: ``advtrain evaluate``'s default, so that a sweep's report
#: and one the command line makes of the same run agree (the seeds follow the chunks).
EVAL_BATCH = 1000


def evaluate_trial(
    run_dir: Path,
    space: SearchSpace,
    *,
    suite: str,
    limit: int | None,
    device: str | None,
) -> dict[str, Any]:
    """The run's test-split figures under ``suite`` at the sweep's radius: ``clean``,
    ``robust``, ``masking`` (a verdict fired or an escalation lowered robust accuracy), ``n``,
    ``report`` (the JSON file's path)."""
    loaded = load_run(run_dir)
    eps = space.eval_eps
    threat = loaded.data.info.threat_model(norm=loaded.config.norm, eps=eps)
    path = run_dir / REPORT
    n = len(loaded.data.test.y) if limit is None else min(limit, len(loaded.data.test.y))
    cached = _cached(path, suite, threat.norm, threat.eps, n)
    if cached is not None:
        return cached
    report = evaluate_loaded(loaded, threat, suite=suite, limit=limit, device=device)
    report.to_json(path)
    return _figures(report.to_dict(), path)


def evaluate_loaded(
    loaded: LoadedRun,
    threat: Any,
    *,
    suite: str,
    limit: int | None,
    device: str | None,
    seed: int | None = None,
    batch_size: int = EVAL_BATCH,
) -> Report:
    """``loaded``'s model on its first ``limit`` test points under ``suite`` and ``threat``."""
    data = loaded.data
    x, y = data.test.x[:limit], data.test.y[:limit]
    model = loaded.model
    if device is not None:
        model = model.to(device)
    report = evaluate(
        model,
        x,
        y,
        threat=threat,
        suite=suite,
        seed=loaded.config.seed if seed is None else seed,
        batch_size=batch_size,
        n_classes=data.info.n_classes,
        positive_class=data.info.positive_class,
        progress=False,
    )
    report.settings["dataset"] = dataset_name(loaded)
    return report


def dataset_name(loaded: LoadedRun) -> str:
    """The dataset as ``advtrain evaluate`` names it in a report's settings."""
    config = loaded.config
    if config.data is None:
        return config.dataset
    return f"{'table' if config.schema else 'images'} {config.data}"


def _cached(path: Path, suite: str, norm: str, eps: float, n: int) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    settings = data.get("settings", {}) if isinstance(data, dict) else {}
    same = (
        settings.get("suite") == suite
        and settings.get("norm") == norm
        and settings.get("n") == n
        and isinstance(settings.get("eps"), (int, float))
        and abs(float(settings["eps"]) - eps) <= 1e-9
    )
    return _figures(data, path) if same else None


def _figures(data: dict[str, Any], path: Path) -> dict[str, Any]:
    try:
        return {
            "clean": float(data["clean_accuracy"]),
            "robust": float(data["robust_accuracy"]),
            "masking": bool(masking_findings(data)),
            "n": int(data["settings"]["n"]),
            "suite": data["settings"]["suite"],
            "report": str(path),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise AdvtrainError(f"'{path}' is not an evaluation report ({exc})") from None


def evaluate_like(
    run_dir: str | Path, baseline: dict[str, Any], *, device: str | None = None
) -> dict[str, Any]:
    """The report of ``run_dir``'s kept model measured as ``baseline`` was: its norm, eps,
    suite, first ``n`` test points, seed and chunk size (a one-line error when the run's data
    are another dataset, or have fewer test points)."""
    loaded = load_run(run_dir)
    settings = baseline["settings"]
    dataset = dataset_name(loaded)
    if settings.get("dataset") not in (None, dataset):
        raise AdvtrainError(
            "cannot compare with the baseline, measured under another threat model or suite: "
            f"dataset {dataset!r} here, {settings['dataset']!r} in the baseline"
        )
    suite = settings["suite"]
    if suite not in ("quick", "standard", "thorough"):
        raise AdvtrainError(f"the baseline's suite {suite!r} cannot be re-run on a run directory")
    n_test = len(loaded.data.test.y)
    n = settings.get("n", n_test)
    if not isinstance(n, int) or n > n_test:
        raise AdvtrainError(
            f"the baseline was measured on {n} points; '{run_dir}' has {n_test} test points"
        )
    threat = loaded.data.info.threat_model(norm=settings["norm"], eps=float(settings["eps"]))
    report = evaluate_loaded(
        loaded,
        threat,
        suite=suite,
        limit=n,
        device=device,
        seed=int(settings.get("seed", loaded.config.seed)),
        batch_size=int(settings.get("batch_size", 1000)),
    )
    return report.to_dict()
