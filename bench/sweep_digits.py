"""A sweep of about 30 trials on digits, in bounded time, and its front against the hand-picked
default (``make demo``: ``advtrain train`` with no options, PGD-10 at eps 0.2, 30 epochs).

The default is enqueued as the study's first trial, so it is trained and measured by the same
pipeline as every other trial. ``--workers`` processes (one thread each) share the study through
the SQLite file in the sweep directory, as workers on several machines would through an RDB URL;
each starts no new trial after ``--timeout`` seconds (Optuna's ``optimize(timeout=...)``) and the
study stops at ``--trials`` finished trials (``MaxTrialsCallback``). The constraint clean >= 0.97
steers the sampler; the front compared with the default is taken over every finished trial (the
validation split is 180 images, where one image is 0.56 points, and a constraint on it can
leave out configurations that meet it on the test split). That front, and the default, are
measured on the test split with the standard suite at eps 0.2 (the README's figures are the same
suite on the same 360 test points), and the script says whether a configuration of the front
dominates the default, or by how much the closest falls short. ``--evaluate-only`` does that last
part again on the study as it stands.

    .venv/bin/python bench/sweep_digits.py     # 2 workers; no new trial after --timeout (960 s)
    .venv/bin/python bench/sweep_digits.py --trials 4 --timeout 60 --suite quick   # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import torch

from advtrain.tuning import load_space, run_sweep
from advtrain.tuning.evaluate_front import evaluate_trial
from advtrain.tuning.study import DEFAULT_STUDY, default_storage
from advtrain.tuning.sweep import evaluate_front, summarise

#: The README's hand-picked default, measured with the standard suite on digits' test split.
README_DEFAULT = {"clean": 0.978, "robust": 0.622}
#: ``advtrain train``'s defaults on digits, in the space's keys.
DEFAULT = {
    "method": "pgd",
    "eps": 0.2,
    "lr": 3e-3,
    "epochs": 30,
    "schedule": "constant",
    "adv_ratio": 1.0,
}
SPACE = """
[train]
dataset = "digits"
attack_steps = 10
eval_steps = 10

[space]
method = { choices = ["pgd", "trades"] }
"method_options.beta" = { low = 1.0, high = 8.0, when = { method = ["trades"] } }
eps = { low = 0.15, high = 0.3 }
adv_ratio = { low = 0.5, high = 1.0 }
lr = { low = 1e-3, high = 1e-2, log = true }
epochs = { low = 10, high = 30, step = 10 }
schedule = { choices = ["constant", "cosine", "onecycle"] }

[sweep]
objectives = ["clean", "robust"]
min_clean = 0.97
eval_eps = 0.2
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/.cache/sweep_digits")
    parser.add_argument("--trials", type=int, default=30, help="finished trials in the study")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=960.0, help="no new trial after (s)")
    parser.add_argument("--suite", default="standard")
    parser.add_argument("--fresh", action="store_true", help="delete an earlier sweep first")
    parser.add_argument("--evaluate-only", action="store_true", help="no new trial")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    space_path = out / "space.toml"
    space_path.write_text(SPACE, encoding="utf-8")
    space = load_space(space_path)
    started = time.perf_counter()
    load_before = os.getloadavg()
    # the study, with the default enqueued as its first trial
    run_sweep(space, out, trials=0, evaluate=False, enqueue=[DEFAULT])
    codes = [] if args.evaluate_only else run_workers(args, space_path, out)
    trained = time.perf_counter() - started
    load_trials = os.getloadavg()
    # the front over every finished trial (the constraint only steered the sampler)
    study = optuna.load_study(study_name=DEFAULT_STUDY, storage=default_storage(out))
    open_space = dataclasses.replace(space, min_clean=None)
    result = summarise(study, open_space, default_storage(out), out)
    evaluate_front(result, open_space, suite=args.suite, test_limit=None, device=None, log=print)
    default_trial = min(result.trials, key=lambda t: t.number)
    if default_trial.test is None and default_trial.run_dir:
        default_trial.test = evaluate_trial(
            Path(default_trial.run_dir), space, suite=args.suite, limit=None, device=None
        )
    total = time.perf_counter() - started
    result.to_json(out / "sweep.json")
    result.to_html(out / "sweep.html")
    summary = verdict(result, default_trial)
    finished = [t for t in study.trials if t.datetime_complete is not None]
    if finished:
        first = min(t.datetime_start for t in finished if t.datetime_start is not None)
        last = max(t.datetime_complete for t in finished if t.datetime_complete is not None)
        summary["trial_phase_wall_s"] = round((last - first).total_seconds(), 1)
        summary["trial_seconds_sum"] = round(
            sum(t.duration.total_seconds() for t in finished if t.duration is not None), 1
        )
    summary.update(
        workers=args.workers,
        worker_exit_codes=codes,
        trials_seconds=round(trained, 1),
        total_seconds=round(total, 1),
        counts=result.counts(),
        load_average_before=load_before,
        load_average_after_trials=load_trials,
        load_average_end=os.getloadavg(),
        suite=args.suite,
    )
    (out / "bench.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps(summary, indent=2))


def run_workers(args: argparse.Namespace, space_path: Path, out: Path) -> list[int]:
    """``--workers`` processes of ``advtrain sweep`` on the study, one thread each."""
    per_worker = math.ceil(args.trials / args.workers)
    command = [sys.executable, "-m", "advtrain", "sweep", str(space_path), "--out", str(out)]
    command += ["--trials", str(per_worker), "--max-trials", str(args.trials)]
    command += ["--timeout", str(args.timeout), "--no-evaluate", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    workers = [
        subprocess.Popen([*command, "--seed", str(seed)], env=env) for seed in range(args.workers)
    ]
    return [worker.wait() for worker in workers]


def verdict(result, default_trial) -> dict:  # type: ignore[no-untyped-def]
    """The front's test figures against the default's (measured here) and the README's."""
    base = default_trial.test or {}
    rows = []
    for number in result.front:
        trial = result.trial(number)
        if trial.test is None or number == default_trial.number:  # the default itself
            continue
        rows.append(
            {
                "trial": number,
                "params": trial.params,
                "val_clean": trial.val_clean,
                "val_robust": trial.val_robust,
                "test_clean": trial.test["clean"],
                "test_robust": trial.test["robust"],
                "masking": trial.test["masking"],
                "seconds": trial.seconds,
            }
        )

    def beats(row: dict, ref: dict) -> bool:
        c, r = row["test_clean"], row["test_robust"]
        return c >= ref["clean"] and r >= ref["robust"] and (c > ref["clean"] or r > ref["robust"])

    def shortfall(row: dict, ref: dict) -> float:
        return max(0.0, ref["clean"] - row["test_clean"]) + max(
            0.0, ref["robust"] - row["test_robust"]
        )

    found: dict = {"front": rows, "default_trial": default_trial.number, "default_test": base}
    for name, ref in (("measured_default", base), ("readme_default", README_DEFAULT)):
        if not ref or not rows:
            continue
        winners = [row["trial"] for row in rows if beats(row, ref)]
        closest = min(rows, key=lambda row: shortfall(row, ref))
        found[name] = {
            "reference": {"clean": ref["clean"], "robust": ref["robust"]},
            "dominated_by": winners,
            "closest": closest["trial"],
            "closest_short_by_points": {
                "clean": round(100 * max(0.0, ref["clean"] - closest["test_clean"]), 2),
                "robust": round(100 * max(0.0, ref["robust"] - closest["test_robust"]), 2),
            },
        }
    return found


if __name__ == "__main__":
    main()
