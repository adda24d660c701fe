"""The transfer check: a surrogate distilled from the model's own predictions on the evaluation
points, whose adversarial examples must not beat the white-box attacks (they do when the
gradients are masked)."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from torch import nn

from advtrain.attacks import APGD
from advtrain.errors import AdvtrainError
from advtrain.evaluation import CheckName, predict
from advtrain.evaluation.findings import VERDICT, Check
from advtrain.evaluation.surrogate_check import distil_surrogate, surrogate_transfer
from advtrain.threat import ThreatModel

torch.set_num_threads(1)
#: the undefended model keeps most points at 0.1; behind the quantisation, more transfer at 0.15
THREAT, MASKED_THREAT = ThreatModel("linf", 0.1), ThreatModel("linf", 0.15)


class ZeroGradientQuantized(nn.Module):
    """Input quantisation to 8 levels, a step function: its gradient is zero almost everywhere,
    so white-box attacks stall while the decision is unchanged."""

    def __init__(self, model: nn.Module, levels: int = 8) -> None:
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * (self.levels - 1)) / (self.levels - 1))


def _points(model: nn.Module, digits, n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits.test.x[: n + 10], digits.test.y[: n + 10]
    correct = predict(model, x) == y
    return x[correct][:n], y[correct][:n]


def _check(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, seed: int = 0
) -> Check:
    def judge(z: torch.Tensor) -> torch.Tensor:
        return predict(model, z)

    survived = judge(APGD(threat, seed=0)(model, x, y)) == y
    return surrogate_transfer(model, judge, threat, x, y, survived, seed=seed)


@pytest.fixture(scope="module")
def masked(digits_model, digits):
    model = ZeroGradientQuantized(digits_model)
    x, y = _points(model, digits)
    return model, x, y, _check(model, x, y, MASKED_THREAT)


def test_honest_model_does_not_fire(digits_model, digits):
    x, y = _points(digits_model, digits)
    check = _check(digits_model, x, y, THREAT)
    evidence = check.evidence
    assert check.name == CheckName.TRANSFER.value and check.severity == VERDICT
    assert not check.triggered, check.detail
    assert evidence["survivors"] >= 10, evidence  # white-box survivors exist, and hold
    assert evidence["agreement"] >= 0.95, evidence
    assert evidence["queries"] > len(x) and 0 < evidence["transfer_success"] < 1, evidence


def test_zero_gradient_defence_fires(masked):
    _, x, _, check = masked
    evidence = check.evidence
    assert check.triggered, check.detail
    assert evidence["survivors"] >= 0.9 * len(x), evidence  # white-box APGD is stalled
    assert evidence["broken"] >= 0.25 * evidence["survivors"], evidence
    assert f"transfers to {evidence['broken']} of the {evidence['survivors']} points" in (
        check.detail
    )


def test_same_seed_same_check(masked):
    model, x, y, check = masked
    assert asdict(_check(model, x, y, MASKED_THREAT, seed=0)) == asdict(check)


def test_distilled_surrogate_agrees_with_the_model_on_its_points(digits_model, digits):
    x, _ = _points(digits_model, digits, n=30)
    distilled = distil_surrogate(digits_model, x, THREAT, seed=1, copies=2, epochs=10)
    assert distilled.agreement >= 0.9
    assert distilled.queries == 30 * (1 + 2 + 2)  # the points, their copies, the Jacobian steps
    agree = predict(distilled.model, x) == predict(digits_model, x)
    assert float(agree.float().mean()) == distilled.agreement


def test_bad_arguments(digits_model, digits):
    x, y = _points(digits_model, digits, n=5)
    with pytest.raises(AdvtrainError, match="survived has 4 entries for 5 points"):
        survived = torch.ones(4, dtype=torch.bool)
        surrogate_transfer(digits_model, lambda z: z, THREAT, x, y, survived, 0)
    with pytest.raises(AdvtrainError, match="copies"):
        distil_surrogate(digits_model, x, THREAT, seed=0, copies=0)
