"""run_attack: one attack measured (what ``advtrain attack`` prints and saves), and the check
that a model fits a dataset's inputs and classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from advtrain.attacks import PGD
from advtrain.errors import AdvtrainError
from advtrain.evaluation import predict
from advtrain.evaluation.attack_run import AttackRun, run_attack
from advtrain.models import check_model_output
from advtrain.threat import ThreatModel, lp_norm


@pytest.fixture(scope="module")
def problem():
    """A linear classifier of 4 classes on 6 features, and 40 points."""
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    x = torch.rand(40, 6)
    y = model(x).argmax(dim=1)
    y[:8] = (y[:8] + 1) % 4  # some points the model gets wrong
    return model, x, y


def attack(eps: float = 0.3) -> PGD:
    return PGD(ThreatModel(norm="linf", eps=eps), steps=5, seed=0)


def test_untargeted_figures_follow_from_the_arrays(problem):
    model, x, y = problem
    run = run_attack(model, attack(), x, y, batch_size=7)
    assert run.target is None and bool(run.attacked.all())
    assert torch.equal(run.pred_clean, predict(model, x))
    assert torch.equal(run.x_adv, attack()(model, x, y))
    assert torch.equal(run.pred_adv, predict(model, run.x_adv))
    assert torch.equal(run.success, run.pred_adv != y)
    assert torch.equal(run.perturbation_norm, lp_norm(run.x_adv - x, "linf"))
    assert run.n == 40 and run.n_attacked == 40 and run.successes == int(run.success.sum())
    assert run.clean_accuracy == float((run.pred_clean == y).float().mean())
    assert run.adversarial_accuracy == float((run.pred_adv == y).float().mean())
    assert run.success_rate == run.successes / 40
    expected_median = float(np.median(run.perturbation_norm[run.success].numpy()))
    assert run.median_perturbation_norm == expected_median
    summary = run.summary()
    assert summary == {
        "n": 40,
        "attacked": 40,
        "successes": run.successes,
        "clean_accuracy": run.clean_accuracy,
        "adversarial_accuracy": run.adversarial_accuracy,
        "success_rate": run.success_rate,
        "median_perturbation_norm": expected_median,
        "seconds": round(run.seconds, 3),
    }
    arrays = run.arrays()
    assert set(arrays) == {
        "x",
        "x_adv",
        "y",
        "pred_clean",
        "pred_adv",
        "success",
        "perturbation_norm",
    }
    assert arrays["success"].dtype == bool and arrays["perturbation_norm"].dtype == np.float32


def test_targeted_leaves_the_target_class_alone(problem):
    model, x, y = problem
    target_class = int(y[0])
    run = run_attack(model, attack(1.0), x, y, target=target_class)
    own = y == target_class
    assert bool(own.any()) and bool((~own).any())
    assert torch.equal(run.attacked, ~own)
    assert torch.equal(run.x_adv[own], x[own])  # never attacked
    assert torch.equal(run.success, (run.pred_adv == target_class) & ~own)
    assert run.n_attacked == int((~own).sum())
    assert run.success_rate == run.successes / run.n_attacked
    assert (run.arrays()["target"] == target_class).all()
    per_point = run_attack(model, attack(1.0), x, y, target=torch.full_like(y, target_class))
    assert torch.equal(per_point.x_adv, run.x_adv)


def test_a_target_of_the_wrong_shape_is_refused(problem):
    model, x, y = problem
    with pytest.raises(AdvtrainError, match="one per point"):
        run_attack(model, attack(), x, y, target=torch.zeros(3, dtype=torch.int64))


def test_no_points_gives_nan_figures_and_null_in_the_summary(problem):
    model, x, y = problem
    run = run_attack(model, attack(), x[:0], y[:0])
    assert isinstance(run, AttackRun) and run.n == 0
    assert math.isnan(run.clean_accuracy) and math.isnan(run.success_rate)
    assert math.isnan(run.median_perturbation_norm)
    summary = run.summary()
    assert summary["clean_accuracy"] is None and summary["median_perturbation_norm"] is None


def test_model_output_check(problem):
    model, x, _ = problem
    check_model_output(model, x, 4)
    check_model_output(model, x[:0], 3)  # nothing to check
    with pytest.raises(AdvtrainError, match=r"returns \(1, 4\) for one input; expected 3 logits"):
        check_model_output(model, x, 3)
    with pytest.raises(AdvtrainError, match=r"fails on inputs of shape \(5,\): RuntimeError"):
        check_model_output(model, x[:, :5], 4)
    with pytest.raises(AdvtrainError, match="returns tuple for one input"):
        check_model_output(lambda t: (t,), x, 4)  # type: ignore[arg-type]
