"""``advtrain sweep | check``: search training settings on Optuna; gate robustness in CI.

Both commands parse, call :mod:`advtrain.tuning` and print; ``check`` returns its exit status
(0 holds, 1 regressed), bad input of any kind ends with one line and status 2.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import AdvtrainError
from .processes import echo

SUITES = ("quick", "standard", "thorough")


@click.command(name="sweep")
@click.argument("space_path", metavar="SPACE.toml", type=click.Path(dir_okay=False))
@click.option("--out", default="runs/sweep", show_default=True, help="The sweep directory.")
@click.option(
    "--trials",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="Trials this worker runs (0: only summarise and evaluate the study).",
)
@click.option("--timeout", type=float, help="Start no new trial after this many seconds.")
@click.option(
    "--max-trials",
    type=click.IntRange(min=1),
    help="Stop once the study holds this many finished trials, whichever worker ran them.",
)
@click.option(
    "--storage",
    help="An Optuna RDB URL shared by workers (postgresql://..., mysql://..., sqlite:///...; "
    "default: sqlite OUT/sweep.db).",
)
@click.option("--study", default="advtrain-sweep", show_default=True, help="The study's name.")
@click.option("--objectives", help="clean,robust (a Pareto front, default) or robust.")
@click.option("--min-clean", type=float, help="Constraint: clean validation accuracy >= this.")
@click.option("--eval-eps", type=float, help="Radius robust accuracy is measured at.")
@click.option("--sampler", help="tpe (default), nsga2 or random.")
@click.option(
    "--pruner",
    help="median (default with one objective), successive-halving, hyperband, none "
    "(two objectives: none; Optuna prunes single-objective studies only).",
)
@click.option("--seed", type=int, help="The sampler's seed (give each worker its own).")
@click.option(
    "--suite",
    type=click.Choice(SUITES),
    default="standard",
    show_default=True,
    help="The suite the front is measured with on the test split.",
)
@click.option("--test-limit", type=click.IntRange(min=1), help="Evaluate the first N test points.")
@click.option(
    "--evaluate/--no-evaluate",
    default=True,
    help="Measure the front on the test split (off: for extra workers).",
)
@click.option("--device", help="Every trial's device (default: the space's, auto).")
@click.option("--quiet", is_flag=True, help="No line per trial.")
def sweep(
    space_path: str,
    out: str,
    trials: int,
    timeout: float | None,
    max_trials: int | None,
    storage: str | None,
    study: str,
    objectives: str | None,
    min_clean: float | None,
    eval_eps: float | None,
    sampler: str | None,
    pruner: str | None,
    seed: int | None,
    suite: str,
    test_limit: int | None,
    evaluate: bool,
    device: str | None,
    quiet: bool,
) -> None:
    """Search training settings (SPACE.toml) for the front of clean against robust accuracy.

    Every trial is a run directory under OUT/trials; OUT/sweep.json and OUT/sweep.html hold the
    trials, the front, its test-split figures and the recommended configurations. Start the
    same command on several machines with one --storage URL to share the study.
    """
    from ..tuning import load_space, run_sweep
    from ..tuning.study import require_optuna

    require_optuna()
    space = load_space(space_path, objectives=objectives, min_clean=min_clean, eval_eps=eval_eps)
    result = run_sweep(
        space,
        out,
        trials=trials,
        timeout=timeout,
        storage=storage,
        study=study,
        sampler=sampler,
        pruner=pruner,
        seed=seed,
        max_trials=max_trials,
        evaluate=evaluate,
        suite=suite,
        test_limit=test_limit,
        device=device,
        log=None if quiet else echo,
    )
    directory = Path(out)
    json_path = result.to_json(directory / "sweep.json")
    html_path = result.to_html(directory / "sweep.html")
    counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(result.counts().items()))
    echo(f"study {result.study} ({result.storage}): {counts}")
    if result.note:
        echo(result.note)
    for number in result.front:
        trial = result.trial(number)
        test = trial.test
        measured = (
            f"; test clean {test['clean']:.2%} robust {test['robust']:.2%} ({test['suite']})"
            if test
            else ""
        )
        mark = "  <- pick" if number == result.pick else ""
        echo(
            f"front: trial {number} val clean {trial.val_clean:.2%} robust "
            f"{trial.val_robust:.2%}{measured}  {trial.params}{mark}"
        )
    echo(f"sweep: {json_path}  page: {html_path}")


@click.command(name="check")
@click.argument("target", metavar="RUN_DIR|REPORT.json", type=click.Path())
@click.option(
    "--baseline",
    required=True,
    type=click.Path(dir_okay=False),
    help="The baseline's report JSON (advtrain evaluate --json).",
)
@click.option(
    "--max-drop",
    type=float,
    default=0.01,
    show_default=True,
    help="Largest allowed drop of clean or robust accuracy (absolute, 0.01 = 1 point).",
)
@click.option("--require-clean", type=float, help="Clean accuracy must be at least this.")
@click.option("--require-robust", type=float, help="Robust accuracy must be at least this.")
@click.option(
    "--allow-masking",
    is_flag=True,
    help="Do not fail on a gradient-masking verdict in the new report.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    help="Write the new report (RUN_DIR) and the verdict here.",
)
@click.option("--device", help="Where a RUN_DIR is re-evaluated (default: the model's).")
def check(
    target: str,
    baseline: str,
    max_drop: float,
    require_clean: float | None,
    require_robust: float | None,
    allow_masking: bool,
    json_path: str | None,
    device: str | None,
) -> int:
    """Gate robustness in CI: RUN_DIR (re-evaluated as the baseline was) or REPORT.json against
    --baseline. Exit status 0: holds; 1: regressed (named); 2: bad input (a missing or corrupt
    file, a different threat model or suite)."""
    from ..tuning import evaluate_like, gate, read_report
    from ..util import atomic_write_json

    base = read_report(baseline)
    path = Path(target)
    if path.is_dir():
        echo(f"re-evaluating {path} as the baseline was measured ...")
        new = evaluate_like(path, base, device=device)
    elif path.exists():
        new = read_report(path)
    else:
        raise AdvtrainError(f"'{target}' is neither a run directory nor a report file")
    verdict = gate(
        new,
        base,
        max_drop=max_drop,
        require_clean=require_clean,
        require_robust=require_robust,
        allow_masking=allow_masking,
    )
    for line in verdict.lines():
        echo(line)
    if json_path:
        atomic_write_json(json_path, {"verdict": verdict.to_dict(), "report": new})
    return 0 if verdict.holds else 1
