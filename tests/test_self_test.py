"""The binarization self-test (Zimmermann et al. 2022): it passes for working attacks, and fails
for broken ones — both directions — and it reads the features of models it can, with clear
errors for the others."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import advtrain
from advtrain.attacks import PGD
from advtrain.attacks.base import Attack, Outcome
from advtrain.errors import AdvtrainError
from advtrain.evaluation.findings import VERDICT, CheckName
from advtrain.evaluation.self_test import Binarized, readout_layer, spaced
from advtrain.evaluation.self_test_run import binarization_test
from advtrain.evaluation.steps import Step
from advtrain.threat import ThreatModel

torch.set_num_threads(1)
THREAT = ThreatModel(norm="linf", eps=0.1)


class ReturnsClean(Attack):
    """A broken attack: it returns every point as it came."""

    def run(self, model, x, y, target, generator):
        return Outcome(x.clone(), torch.zeros(len(x), dtype=torch.bool), torch.zeros(len(x)))


@pytest.fixture(scope="module")
def clean_points(digits, digits_model):
    x, y = digits.test.x, digits.test.y
    with torch.no_grad():
        right = digits_model(x).argmax(1) == y
    return x[right][:60]


def test_the_standard_attacks_pass(digits_model, clean_points):
    result = binarization_test(digits_model, clean_points, THREAT, points=10)
    assert len(result.points) == 10 and not result.setup_failed
    assert result.pass_rate >= 0.95
    check = result.check()
    assert check.name == CheckName.SELF_TEST.value and not check.triggered
    assert check.evidence["features"] == "7"  # the digits-cnn's last Linear
    assert result.steps[0] == "apgd-ce"


def test_an_attack_returning_the_clean_point_fails(digits_model, clean_points):
    broken = [Step("returns-clean", ReturnsClean(THREAT))]
    result = binarization_test(digits_model, clean_points, THREAT, steps=broken, points=6)
    assert result.pass_rate == 0.0
    check = result.check()
    assert check.triggered and check.severity == VERDICT
    assert check.evidence["failures"] == result.points
    assert "returns-clean" in check.detail and "missed it at points" in check.detail


def test_a_pgd_without_steps_fails_and_a_real_one_passes(digits_model, clean_points):
    """PGD from a random start whose step moves nothing stays among the inner points."""
    still = [Step("pgd-still", PGD(THREAT, steps=10, step_size=1e-12))]
    moving = [Step("pgd", PGD(THREAT, steps=10))]
    assert (
        binarization_test(digits_model, clean_points, THREAT, steps=still, points=6)
        .check()
        .triggered
    )
    assert (
        binarization_test(digits_model, clean_points, THREAT, steps=moving, points=6).pass_rate == 1
    )


def test_test_points_are_two_eps_apart(clean_points):
    x = torch.cat([clean_points[:3], clean_points[:1] + 0.15])  # the last is 0.15 from the first
    chosen = spaced(x, torch.arange(len(x)), THREAT, 10)
    assert chosen.tolist() == [0, 1, 2]


def test_the_binarized_model_picks_each_inputs_own_readout(digits_model, clean_points):
    anchors = clean_points[:3]
    weight = torch.zeros(3, 128)
    bias = torch.tensor([-1.0, 0.0, 1.0])
    model = Binarized(digits_model, digits_model[7], anchors, weight, bias, "linf")
    shuffled = torch.cat([anchors[2:], anchors[:1] + 0.05, anchors[1:2]])
    out = model(shuffled)
    assert out.shape == (3, 2)
    assert out[:, 1].tolist() == [1.0, -1.0, 0.0]


def test_readout_errors_name_the_problem(digits_model, clean_points):
    assert readout_layer(digits_model, clean_points[:2])[0] == "7"
    assert readout_layer(digits_model, clean_points[:2], "7")[0] == "7"
    with pytest.raises(AdvtrainError, match=r"output of layer '5' is not the model's output"):
        readout_layer(digits_model, clean_points[:2], "5")
    with pytest.raises(AdvtrainError, match=r"is a ReLU, not a torch\.nn\.Linear"):
        readout_layer(digits_model, clean_points[:2], "6")
    with pytest.raises(AdvtrainError, match="no module named 'head'"):
        readout_layer(digits_model, clean_points[:2], "head")
    convolutional = nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten())
    with pytest.raises(AdvtrainError, match=r"no torch\.nn\.Linear layer"):
        readout_layer(convolutional, clean_points[:2])


def test_evaluate_reports_the_self_test(digits_model, digits):
    x, y = digits.test.x[:24], digits.test.y[:24]
    report = advtrain.evaluate(
        digits_model, x, y, eps=0.1, suite="quick", self_test=True, self_test_points=6
    )
    check = next(c for c in report.diagnostics if c.name == CheckName.SELF_TEST.value)
    assert not check.triggered and check.evidence["points"] == 6
    assert all(0 <= int(p) < 24 for p in check.evidence["found_by"])
    assert "self-test" in report.settings["seconds_by_stage"]
    assert not report.model_card["unreliable"]
    convolutional = nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten())
    with pytest.raises(AdvtrainError, match=r"self-test: the model has no torch\.nn\.Linear"):
        advtrain.evaluate(convolutional, x, y, eps=0.1, suite="quick", self_test=True)
