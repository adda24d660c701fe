"""advtrain.evaluate: the cascade, metrics, and masking defences exposed without knowing their kind.

Small versions of defences that only mask gradients, on digits (linf eps 0.3, where the
undefended model has no real robustness): naive PGD reports high robust accuracy against each,
and the standard evaluation must report what an adaptive attacker gets (near zero) and say why.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import advtrain
from advtrain.attacks import PGD
from advtrain.errors import AdvtrainError
from advtrain.evaluation import CheckName, Report, metrics, predict
from advtrain.evaluation.report import VERDICT, robustness_score

torch.set_num_threads(1)
EPS = 0.3


class LogitScale(nn.Module):
    """Defensive distillation at a high temperature, in effect: logits multiplied by T at test
    time, so the softmax saturates and cross-entropy gradients underflow to zero."""

    def __init__(self, model: nn.Module, temperature: float = 1000.0) -> None:
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.temperature


class Quantized(nn.Module):
    """A non-differentiable input transformation: quantisation to 8 levels (torch.round)."""

    def __init__(self, model: nn.Module, levels: int = 8) -> None:
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * (self.levels - 1)) / (self.levels - 1))


class Wiggle(nn.Module):
    """A kind we do not list: a small, very high-frequency term added to the logits. Its
    value barely moves predictions but its gradient drowns the model's. ``random=True`` draws
    a new term at every call (randomness at every call)."""

    def __init__(
        self, model: nn.Module, random: bool, amplitude: float = 0.5, frequency: float = 1000.0
    ) -> None:
        super().__init__()
        self.model, self.random = model, random
        self.amplitude, self.frequency = amplitude, frequency

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        flat = x.flatten(1)
        generator = None if self.random else torch.Generator().manual_seed(0)
        directions = torch.randn(flat.shape[1], out.shape[1], generator=generator)
        phase = torch.rand(out.shape[1], generator=generator) * 2 * math.pi
        return out + self.amplitude * torch.sin(self.frequency * flat @ directions + phase)


class Softmaxed(nn.Module):
    """A model that returns probabilities instead of logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


class NumpyQuantized(nn.Module):
    """Quantisation done in NumPy: the output is cut off from autograd's graph of the input, and
    no torch-level straight-through estimator can see the step."""

    def __init__(self, model: nn.Module, levels: int = 8) -> None:
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = np.round(x.detach().cpu().numpy() * (self.levels - 1)) / (self.levels - 1)
        return self.model(torch.from_numpy(steps).to(x.dtype))


class HardLabels(nn.Module):
    """A model that answers one-hot vectors of its decision: neither gradients nor scores."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1]).to(logits.dtype)


def _naive_pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, PGD(eps=EPS, seed=0)(model, x, y)) == y).float().mean())


@pytest.fixture(scope="module")
def points(digits):
    return digits.test.x[:60], digits.test.y[:60]


@pytest.fixture(scope="module")
def honest_report(digits_model, points):
    x, y = points
    return advtrain.evaluate(
        digits_model, x, y, eps=EPS, suite="quick", seed=0, self_test=True, self_test_points=4
    )


def test_report_contract(honest_report, points, tmp_path):
    report = honest_report
    x, _ = points
    assert isinstance(report, Report)
    assert 0.9 <= report.clean_accuracy <= 1.0 and report.robust_accuracy <= 0.05
    assert list(report.per_attack) == ["apgd-ce", "apgd-t", "square"]
    assert report.settings["gives_up"] == ["apgd-t", "square"]  # the budget rules, named
    values = list(report.per_attack.values())
    assert all(a >= b for a, b in zip(values, values[1:]))  # survivors only ever fall
    assert report.robust_accuracy == pytest.approx(values[-1])
    assert report.robustness_score == pytest.approx(
        robustness_score(report.clean_accuracy, report.robust_accuracy)
    )
    assert {
        "zero or NaN gradients",
        "randomness",
        "single step stronger than iterative",
        "unbounded attack fails",
        "success does not grow with eps",
        "black-box stronger than white-box",
        "loss still improving",
        "saturated softmax",
        "probabilities instead of logits",
    } <= {c.name for c in report.diagnostics}
    assert all(isinstance(c.triggered, bool) and c.detail for c in report.diagnostics)
    assert not report.triggered and not report.escalations  # an undefended, honest model
    # per-sample: every point accounted for, norms inside the threat model
    assert len(report.per_sample) == len(x)
    for row in report.per_sample:
        if row["label"] != row["clean_pred"]:
            assert row["broken_by"] == "clean"
        elif row["broken_by"] is not None:
            assert row["broken_by"] in report.per_attack
            assert row["perturbation_norm"] <= EPS + 1e-5
            assert row["min_norm"] <= row["perturbation_norm"] + 1e-6
    # the curve starts at the clean accuracy and never rises; the radius is on it
    curve = report.accuracy_vs_eps
    assert curve[0] == (0.0, pytest.approx(report.clean_accuracy))
    assert all(a[1] >= b[1] for a, b in zip(curve, curve[1:]))
    assert report.adversarial_radius is not None and report.adversarial_radius < EPS
    assert report.robust_margin["found"] == 1.0 and 0 < report.robust_margin["median"] < EPS
    assert report.entropy["adversarial"] > report.entropy["clean"]
    assert (
        report.defensive_margin["adversarial_logit_margin"]
        < 0
        < report.defensive_margin["clean_logit_margin"]
    )
    macro = report.classification["clean"]["macro"]
    assert 0.85 < macro.f1 <= 1.0 and report.classification["adversarial"]["macro"].recall < 0.1
    # JSON: every figure, inf as null
    path = report.to_json(tmp_path / "report.json")
    data = json.loads(path.read_text())
    assert data["robust_accuracy"] == pytest.approx(report.robust_accuracy)
    assert data["per_attack"] == pytest.approx(report.per_attack)
    assert {d["name"] for d in data["diagnostics"]} == {c.name for c in report.diagnostics}
    assert len(data["per_sample"]) == len(x)


def test_every_check_of_the_enum_runs_and_no_other(honest_report):
    assert [c.name for c in honest_report.diagnostics] == [
        "randomness",
        "probabilities instead of logits",
        "zero or NaN gradients",
        "saturated softmax",
        "single step stronger than iterative",
        "unbounded attack fails",
        "success does not grow with eps",
        "black-box stronger than white-box",
        "transfer stronger than white-box",
        "loss still improving",
        "silent success",
        "binarization self-test",
    ]
    assert {c.name for c in honest_report.diagnostics} == {n.value for n in CheckName}
    assert all(type(c.name) is str for c in honest_report.diagnostics)


def test_dataloader_and_seed_reproducibility(digits_model, points, honest_report):
    x, y = points
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    again = advtrain.evaluate(digits_model, loader, eps=EPS, suite="quick", seed=0)
    assert again.robust_accuracy == honest_report.robust_accuracy
    assert [r["broken_by"] for r in again.per_sample] == [
        r["broken_by"] for r in honest_report.per_sample
    ]


@pytest.mark.parametrize(
    "defence, expected, masks",
    [
        (lambda m: LogitScale(m), "saturated softmax", True),
        (lambda m: Quantized(m), "zero or NaN gradients", True),
        (lambda m: Wiggle(m, random=False), "black-box stronger than white-box", True),
        (lambda m: Softmaxed(m), "probabilities instead of logits", False),
        (lambda m: NumpyQuantized(m), "zero or NaN gradients", True),
        (lambda m: HardLabels(m), "zero or NaN gradients", True),
        (lambda m: Softmaxed(LogitScale(m, temperature=50.0)), "zero or NaN gradients", True),
    ],
    ids=[
        "distillation-like",
        "quantisation",
        "unlisted-kind",
        "probabilities",
        "numpy-step",
        "hard-labels",
        "saturated-probabilities",
    ],
)
def test_masking_defences_are_exposed(digits_model, points, defence, expected, masks):
    x, y = points[0][:40], points[1][:40]
    model = defence(digits_model)
    clean = float((predict(model, x) == y).float().mean())
    naive = _naive_pgd_accuracy(model, x, y)
    report = advtrain.evaluate(model, x, y, eps=EPS, suite="quick", seed=0)
    assert clean > 0.9 and (naive > 0.5 or not masks), (clean, naive)  # the mask fools naive PGD
    assert report.robust_accuracy <= 0.05, report.per_attack
    assert expected in {c.name for c in report.triggered}, [c.name for c in report.triggered]


def test_l1_evaluation_breaks_an_undefended_model_and_exposes_a_step_function(digits_model, points):
    """l1 has its own cascade (PGD with the sparse l1 step) and escalations (no APGD for l1)."""
    x, y = points
    honest = advtrain.evaluate(digits_model, x, y, norm="l1", eps=6.0, suite="quick", seed=0)
    assert list(honest.per_attack)[:3] == ["pgd-l1-ce", "pgd-l1-cw", "pgd-l1-dlr"]
    assert honest.robust_accuracy <= 0.05, honest.per_attack
    assert [c.name for c in honest.triggered if c.severity == VERDICT] == []
    masked = advtrain.evaluate(
        Quantized(digits_model), x, y, norm="l1", eps=6.0, suite="quick", seed=0
    )
    assert masked.per_attack["pgd-l1-ce"] > 0.5  # the step function fools plain PGD
    assert masked.robust_accuracy <= 0.05, masked.per_attack
    assert "zero or NaN gradients" in {c.name for c in masked.triggered}


def test_randomised_defence_is_detected_and_attacked_with_eot(digits_model, digits):
    x, y = digits.test.x[:30], digits.test.y[:30]
    model = Wiggle(digits_model, random=True)
    torch.manual_seed(0)
    naive = _naive_pgd_accuracy(model, x, y)
    report = advtrain.evaluate(
        model, x, y, eps=EPS, suite="quick", seed=0, eot_samples=8, votes=9, diagnostics_points=20
    )
    assert naive > 0.5
    assert report.settings["randomized"] is True
    assert "randomness" in {c.name for c in report.triggered}
    assert report.robust_accuracy <= 0.1, report.per_attack
    first = report.escalations[0]
    assert first.reason == "randomness" and first.robust_after < first.robust_before
    # the model draws from torch's global generator; the evaluation seeds it, chunk by chunk
    torch.manual_seed(123)
    again = advtrain.evaluate(
        model, x, y, eps=EPS, suite="quick", seed=0, eot_samples=8, votes=9, diagnostics_points=20
    )
    assert again.per_sample == report.per_sample


def test_honest_adversarially_trained_model_gets_no_verdict(digits, tmp_path):
    """PGD training on digits (eps 0.2, its default; a few epochs): real robustness, no verdict."""
    torch.manual_seed(0)
    model = advtrain.build_model("digits-cnn", in_shape=digits.info.shape, n_classes=10)
    config = advtrain.TrainConfig(
        method="pgd", eps=0.2, epochs=12, attack_steps=5, eval_steps=3, seed=0, out=str(tmp_path)
    )
    advtrain.Trainer(model, digits, config, tmp_path).fit()
    x, y = digits.test.x[:60], digits.test.y[:60]
    report = advtrain.evaluate(model, x, y, eps=0.2, suite="quick", seed=0)
    verdicts = [c.name for c in report.triggered if c.severity == VERDICT]
    assert report.robust_accuracy > 0.3, (report.clean_accuracy, report.per_attack)
    assert verdicts == [], [(c.name, c.detail) for c in report.triggered]


def test_metrics_formulas():
    assert robustness_score(0.0, 0.0) == 0.0
    assert robustness_score(1.0, 0.5) == pytest.approx(2 / 3)
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1])
    assert torch.allclose(metrics.entropy(logits)[1], torch.tensor(math.log(2)))
    assert torch.allclose(metrics.logit_margin(logits, y), torch.tensor([2.0, 0.0]))
    curve = metrics.accuracy_vs_eps(
        torch.tensor([0.1, 0.3, math.inf, 0.0]),
        torch.tensor([True, True, True, False]),
        [0.0, 0.2, 0.4],
        [(0.4, torch.tensor([False, False, True, False]))],
    )
    assert curve == [(0.0, 0.75), (0.2, 0.5), (0.4, 0.0)]
    assert metrics.adversarial_radius(curve, 0.75, threshold=0.5) == 0.2
    assert metrics.adversarial_radius(curve, 0.75, threshold=1.1) is None
    report = metrics.classification_metrics(
        torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]), 2
    )
    assert report["per_class"][1].precision == pytest.approx(2 / 3)
    assert report["per_class"][0].recall == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"suite": "nope"}, "unknown suite"),
        ({"eps": float("inf")}, "finite eps"),
        ({"eps": -1.0}, "eps must be >= 0"),
    ],
)
def test_bad_arguments(digits_model, points, kwargs, message):
    x, y = points
    with pytest.raises(AdvtrainError, match=message):
        advtrain.evaluate(digits_model, x, y, **kwargs)


def test_bad_data(digits_model, points):
    x, y = points
    with pytest.raises(AdvtrainError, match="labels"):
        advtrain.evaluate(digits_model, x)
    with pytest.raises(AdvtrainError, match="outside the threat model's bounds"):
        advtrain.evaluate(digits_model, x + 2, y)


def test_randomised_model_is_attacked_and_measured_with_the_configured_eot_samples(
    digits_model, digits, monkeypatch
):
    """Regression: the metrics' logits once rebuilt EOT with 16 passes whatever ``eot_samples``
    said. Every EOT the evaluation builds must average ``eot_samples`` passes, and no forward call
    may see more copies of the points than ``eot_samples`` or ``votes`` asks for."""
    from advtrain.attacks import EOT

    x, y = digits.test.x[:10], digits.test.y[:10]
    samples_seen: set[int] = set()
    forward = EOT.forward

    def spy(self: EOT, inputs: torch.Tensor) -> torch.Tensor:
        samples_seen.add(self.samples)
        return forward(self, inputs)

    class Rows(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model, self.largest = model, 0

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            self.largest = max(self.largest, len(inputs))
            return self.model(inputs)

    monkeypatch.setattr(EOT, "forward", spy)
    model = Rows(Wiggle(digits_model, random=True))
    report = advtrain.evaluate(
        model, x, y, eps=EPS, suite="quick", seed=0, eot_samples=3, votes=3, diagnostics_points=5
    )
    assert report.settings["randomized"] is True
    assert samples_seen == {3}
    # the surrogate check asks the model about its distillation points in batches of 128
    assert model.largest <= 3 * max(len(x), 128)
