"""``advtrain check``: the robustness gate's exit codes (0 holds, 1 regressed, 2 bad input), its
refusal to compare different threat models, masking, and old report versions."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from advtrain.cli import run
from advtrain.errors import AdvtrainError
from advtrain.evaluation.report import REPORT_FORMAT_VERSION, report_format_version
from advtrain.tuning import evaluate_like, gate, masking_findings, read_report

BASE: dict[str, Any] = {
    "format_version": REPORT_FORMAT_VERSION,
    "clean_accuracy": 0.978,
    "robust_accuracy": 0.622,
    "settings": {
        "norm": "linf",
        "eps": 0.2,
        "suite": "standard",
        "n": 360,
        "n_classes": 10,
        "dataset": "digits",
        "seed": 0,
        "batch_size": 1000,
    },
    "attack_classes": None,
    "positive_class": None,
    "diagnostics": [
        {"name": "randomness", "triggered": False, "detail": "", "severity": "verdict"}
    ],
    "escalations": [],
    "model_card": {"unreliable": False},
}
MASKING_CHECK = {
    "name": "unbounded attack fails",
    "triggered": True,
    "detail": "an unbounded PGD left 3 points standing",
    "severity": "verdict",
}


def report(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    settings = changes.pop("settings", {})
    data.update(changes)
    data["settings"].update(settings)
    return data


def write(tmp_path: Path, name: str, data: dict[str, Any] | str) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


def check(tmp_path: Path, new: dict[str, Any] | str, *flags: str, base: Any = None) -> int:
    baseline = write(tmp_path, "base.json", BASE if base is None else base)
    return run(["check", write(tmp_path, "new.json", new), "--baseline", baseline, *flags])


def test_the_same_figures_hold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(tmp_path, report(clean_accuracy=0.975, robust_accuracy=0.63)) == 0
    said = capsys.readouterr().out
    assert "HOLDS" in said and "linf eps=0.2, standard suite, n=360, digits" in said
    assert len(said.splitlines()) <= 20  # one screen


def test_a_drop_beyond_max_drop_regresses_and_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check(tmp_path, report(robust_accuracy=0.600)) == 1
    said = capsys.readouterr().out
    assert "REGRESSED" in said
    assert "robust accuracy dropped by 2.20 points (62.20% -> 60.00%)" in said
    assert check(tmp_path, report(robust_accuracy=0.600), "--max-drop", "0.05") == 0


def test_required_floors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(tmp_path, report(), "--require-robust", "0.80") == 1
    assert "robust accuracy 62.20% is below the required 80.00%" in capsys.readouterr().out
    assert check(tmp_path, report(clean_accuracy=0.975), "--require-clean", "0.97") == 0
    assert check(tmp_path, report(clean_accuracy=0.975), "--require-clean", "0.98") == 1


def test_a_masking_verdict_fails_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    masked = report(diagnostics=[MASKING_CHECK])
    assert check(tmp_path, masked) == 1
    assert "gradient masking suspected: check 'unbounded attack fails'" in capsys.readouterr().out
    assert check(tmp_path, masked, "--allow-masking") == 0
    escalated = report(
        escalations=[{"reason": "x", "action": "BPDA", "robust_before": 0.7, "robust_after": 0.62}]
    )
    assert masking_findings(escalated) and check(tmp_path, escalated) == 1


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"eps": 0.3}, "eps 0.3 here, 0.2 in the baseline"),
        ({"norm": "l2"}, "norm 'l2' here"),
        ({"suite": "quick"}, "suite 'quick' here, 'standard' in the baseline"),
        ({"n": 100}, "n 100 here, 360 in the baseline"),
        ({"dataset": "mnist"}, "dataset 'mnist' here"),
    ],
)
def test_a_different_threat_model_or_suite_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], settings: dict[str, Any], named: str
) -> None:
    assert check(tmp_path, report(settings=settings)) == 2
    err = capsys.readouterr().err
    assert named in err and "cannot compare" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "does not hold a JSON object"),
        (json.dumps({"settings": {}}), "has no clean_accuracy"),
        (json.dumps(report(format_version=99)), "format_version 99"),
    ],
)
def test_a_corrupt_report_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, named: str
) -> None:
    assert check(tmp_path, content) == 2
    assert named in capsys.readouterr().err
    assert check(tmp_path, report(), base=content) == 2  # the baseline likewise


def test_a_missing_file_is_bad_input(tmp_path: Path) -> None:
    baseline = write(tmp_path, "base.json", BASE)
    assert run(["check", str(tmp_path / "nope.json"), "--baseline", baseline]) == 2
    assert run(["check", baseline, "--baseline", str(tmp_path / "nope.json")]) == 2


def test_an_old_baseline_without_a_version_is_read_as_version_1(tmp_path: Path) -> None:
    old = report()
    del old["format_version"]
    assert report_format_version(old) == 1
    assert check(tmp_path, report(), base=old) == 0
    verdict = gate(report(), read_report(write(tmp_path, "old.json", old)))
    assert verdict.holds and verdict.baseline["format_version"] == 1


def test_gate_checks_its_limits() -> None:
    with pytest.raises(AdvtrainError, match="max_drop"):
        gate(report(), report(), max_drop=-0.1)


def test_a_run_directory_is_re_evaluated_as_the_baseline_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from advtrain.data import load_dataset
    from advtrain.models import build_model
    from advtrain.training import TrainConfig, Trainer

    run_dir = tmp_path / "run"
    config = TrainConfig(epochs=1, attack_steps=1, eval_steps=1, batch_size=128, out=str(run_dir))
    data = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = build_model("digits-cnn", in_shape=data.info.shape, n_classes=10)
    Trainer(model, data, config, run_dir).fit()
    quick = {"suite": "quick", "n": 6, "eps": 0.1}
    floor = report(clean_accuracy=0.0, robust_accuracy=0.0, settings=quick)
    baseline = write(tmp_path, "base.json", floor)
    out = tmp_path / "verdict.json"
    args = ["check", str(run_dir), "--baseline", baseline, "--allow-masking", "--json", str(out)]
    assert run(args) == 0
    assert "re-evaluating" in capsys.readouterr().out
    written = json.loads(out.read_text())
    settings = written["report"]["settings"]
    assert (settings["suite"], settings["n"], settings["eps"]) == ("quick", 6, 0.1)
    assert written["report"]["format_version"] == REPORT_FORMAT_VERSION
    assert written["verdict"]["holds"]
    with pytest.raises(AdvtrainError, match="dataset 'digits' here, 'mnist'"):
        evaluate_like(run_dir, report(settings={**quick, "dataset": "mnist"}))


def test_check_needs_no_optuna(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)
    assert check(tmp_path, report()) == 0
