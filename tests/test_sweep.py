"""``advtrain sweep``: the search space's checks, a sweep on digits in SQLite, two workers on one
SQLite file, pruning, and the front measured on the test split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from advtrain.cli import run
from advtrain.errors import AdvtrainError
from advtrain.tuning import load_space, pareto_front, parse_space, run_sweep

optuna = pytest.importorskip("optuna")

#: Tiny trials: one or two epochs of one-step PGD on digits (about a second each).
TINY = """
[train]
epochs = {epochs}
attack_steps = 1
eval_steps = 1
batch_size = 128
val_fraction = 0.1
"""
SPACE = (
    TINY
    + """
[space]
lr = {{ low = 1e-3, high = 1e-2, log = true }}
method = {{ choices = ["pgd", "trades"] }}
"method_options.beta" = {{ low = 1.0, high = 6.0, when = {{ method = ["trades"] }} }}
"""
)


def write_space(tmp_path: Path, text: str, name: str = "space.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"space": {"epoch": {"low": 1, "high": 3}}}, "unknown key 'epoch'"),
        ({"space": {"lr": {"low": 0.1, "high": 0.01}}}, "low (0.1) must be below high"),
        ({"space": {"lr": {"low": 0.0, "high": 0.01, "log": True}}}, "log scale needs low > 0"),
        ({"space": {"epochs": {"low": 1.5, "high": 3}}}, "integer setting"),
        ({"space": {"adv_ratio": {"low": 0.5, "high": 1.5}}}, "adv_ratio = 1.5"),
        ({"space": {"method": {"choices": []}}}, "non-empty list"),
        ({"space": {"lr": {"low": 1e-3}}}, "needs both low and high"),
        ({"space": {"lr": {"low": 1e-3, "high": 1e-2, "scale": "log"}}}, "unknown field(s) scale"),
        ({"space": {"method_options.beta": {"low": 1.0, "high": 6.0}}}, "with method 'pgd'"),
        ({"space": {"method": {"choices": ["pgd", "nope"]}}}, "unknown method 'nope'"),
        ({"train": {"lr": 0.1}, "space": {"lr": {"low": 1e-3, "high": 1e-2}}}, "both fixed"),
        ({"space": {"lr": {"low": 1e-3, "high": 1e-2}}, "sweep": {"objective": "x"}}, "[sweep]"),
        ({"space": {"lr": {"low": 1e-3, "high": 1e-2}}, "sweep": {"min_clean": 2}}, "min_clean"),
        ({"space": {}}, "searches nothing"),
    ],
)
def test_a_bad_space_fails_with_one_line_naming_it(space: dict, message: str) -> None:
    with pytest.raises(AdvtrainError) as caught:
        parse_space(space)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_space_reads_types_conditions_and_objectives(tmp_path: Path) -> None:
    text = SPACE.format(epochs=2) + '[sweep]\nobjectives = ["robust"]\nmin_clean = 0.5\n'
    space = load_space(write_space(tmp_path, text))
    by_key = {p.key: p for p in space.params}
    assert by_key["lr"].log and not by_key["lr"].integer
    assert by_key["method_options.beta"].applies({"method": "trades"})
    assert not by_key["method_options.beta"].applies({"method": "pgd"})
    assert space.objectives == ("robust",) and space.min_clean == 0.5
    assert space.base.epochs == 2
    config = space.config({"lr": 0.005, "method_options.beta": 3.0, "method": "trades"}, "x")
    assert config.method_options == {"beta": 3.0} and config.out == "x"
    assert parse_space({"space": {"epochs": {"low": 1, "high": 4}}}).params[0].integer
    # command-line overrides win over the file's [sweep]
    assert load_space(write_space(tmp_path, text), objectives="clean,robust").objectives == (
        "clean",
        "robust",
    )


def test_a_sweep_on_digits_in_sqlite_and_its_front_on_the_test_split(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, SPACE.format(epochs=1)))
    out = tmp_path / "sweep"
    result = run_sweep(space, out, trials=2, sampler="random", seed=0, suite="quick", test_limit=8)
    assert (out / "sweep.db").is_file() and result.storage.startswith("sqlite:///")
    assert result.counts() == {"COMPLETE": 2}
    for trial in result.trials:  # every trial is an ordinary run directory
        run_dir = Path(str(trial.run_dir))
        assert (run_dir / "model.safetensors").is_file()
        assert json.loads((run_dir / "config.json").read_text())["out"] == str(run_dir)
        assert 0 <= float(trial.val_robust or 0) <= float(trial.val_clean or 0) <= 1
    scored = [(t.val_clean, t.val_robust) for t in result.trials]
    assert result.front == [result.trials[i].number for i in pareto_front(scored)]
    assert result.pick in result.test_front and set(result.test_front) <= set(result.front)
    first = result.trial(result.front[0])
    assert first.test is not None and first.test["n"] == 8 and first.test["suite"] == "quick"
    report = json.loads(Path(first.test["report"]).read_text())
    assert report["format_version"] == 2 and report["settings"]["dataset"] == "digits"
    page = result.to_html(out / "sweep.html").read_text()
    assert "data:image/png;base64," in page and "Recommended configurations" in page
    assert json.loads(result.to_json(out / "sweep.json").read_text())["front"] == result.front
    # a trial's run loads as any run does
    code = run(["evaluate", str(first.run_dir), "--suite", "pgd", "--steps", "2", "--n", "8"])
    assert code == 0
    # summarised again (no new trial): the reports written beside the runs are read back
    again = run_sweep(space, out, trials=0, suite="quick", test_limit=8)
    assert again.trial(result.front[0]).test == first.test


def test_two_workers_share_one_sqlite_file(tmp_path: Path) -> None:
    path = write_space(tmp_path, SPACE.format(epochs=1))
    out = tmp_path / "shared"
    # two enqueued trials for two workers starting together: on SQLite, Optuna's own queue
    # handed one of them to both unless each transaction takes the lock when it begins
    queued = [{"lr": 0.003, "method": "pgd"}, {"lr": 0.005, "method": "pgd"}]
    run_sweep(load_space(path), out, trials=0, evaluate=False, enqueue=queued)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "advtrain", "sweep", str(path), "--out", str(out)]
    command += ["--trials", "1", "--no-evaluate", "--quiet", "--sampler", "random"]
    workers = [
        subprocess.Popen(
            [*command, "--seed", str(seed)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    outputs = [worker.communicate(timeout=180) for worker in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
    study = optuna.load_study(study_name="advtrain-sweep", storage=f"sqlite:///{out}/sweep.db")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2 and len(states) == 2
    assert sorted(t.params["lr"] for t in study.trials) == [0.003, 0.005]
    run_dirs = {t.user_attrs["run_dir"] for t in study.trials}
    assert len(run_dirs) == 2 and all((Path(d) / "model.safetensors").is_file() for d in run_dirs)


def test_the_pruner_stops_a_trial_after_its_first_epoch(tmp_path: Path) -> None:
    text = TINY.format(epochs=3) + "[space]\nlr = { low = 1e-3, high = 2e-3 }\n"
    space = load_space(write_space(tmp_path, text), objectives="robust", min_clean=0.999)
    # robust accuracy after one epoch of digits is far below 0.99: this pruner must stop it
    pruner = optuna.pruners.ThresholdPruner(lower=0.99)
    result = run_sweep(space, tmp_path / "s", trials=1, pruner=pruner, seed=0, evaluate=False)
    trial = result.trials[0]
    assert trial.state == "PRUNED" and trial.pruned_at == 1
    assert not trial.feasible  # clean accuracy after one epoch is below 0.999
    if hasattr(optuna.trial.Trial, "set_constraint"):  # Optuna's own record of the constraint
        stored = optuna.load_study(study_name="advtrain-sweep", storage=result.storage).trials
        assert stored[0].constraints["min_clean"] == pytest.approx(0.999 - trial.val_clean)
    run_dir = Path(str(trial.run_dir))
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "pruned after epoch 1" in summary["stop_reason"]
    assert (run_dir / "model.safetensors").is_file()  # the run keeps its best epoch


def test_two_objectives_refuse_a_pruner(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, SPACE.format(epochs=1)))
    with pytest.raises(AdvtrainError, match="Optuna prunes single-objective studies only"):
        run_sweep(space, tmp_path / "s", trials=1, pruner="median")


def test_the_command_line_writes_the_page_and_says_the_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_space(tmp_path, SPACE.format(epochs=1))
    out = tmp_path / "cli"
    args = ["--out", str(out), "--trials", "1", "--seed", "0", "--no-evaluate", "--quiet"]
    code = run(["sweep", str(path), *args])
    assert code == 0
    said = capsys.readouterr().out
    assert "front: trial 0" in said and (out / "sweep.html").is_file()
    assert run(["sweep", str(path), "--out", str(out), "--pruner", "nope"]) == 2


def test_without_optuna_the_command_fails_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)
    path = write_space(tmp_path, SPACE.format(epochs=1))
    assert run(["sweep", str(path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "advtrain[tune]" in err and len(err.strip().splitlines()) == 1
