"""The sandwich in the report: verified accuracy (bound propagation, a proven lower bound) <=
robust accuracy under the attacks (an upper bound), and randomized smoothing's certificates of
the smoothed model beside it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import advtrain
from advtrain.certify import Verification
from advtrain.errors import AdvtrainError
from advtrain.evaluation import sandwich as sandwich_module

N = 40


@pytest.fixture(scope="module")
def certified_report(digits, digits_model):
    x, y = digits.test.x[:N], digits.test.y[:N]
    return advtrain.evaluate(
        digits_model,
        x,
        y,
        eps=0.01,
        suite="quick",
        certify="crown",
        smoothing_sigma=0.25,
        smoothing_samples=200,
        batch_size=25,  # two chunks: the certificates are put together chunk by chunk
        diagnostics_points=10,
    )


def test_verified_accuracy_is_below_robust_accuracy_and_every_point_has_a_side(
    certified_report,
):
    certified = certified_report.certified
    assert certified["method"] == "crown"
    assert 0 < certified["verified_accuracy"] <= certified["robust_accuracy"]
    assert certified["robust_accuracy"] == certified_report.robust_accuracy
    assert certified["gap"] == pytest.approx(
        certified["robust_accuracy"] - certified["verified_accuracy"]
    )
    counts = certified["decided_by"]
    assert sum(counts.values()) == N
    assert counts["verified"] / N == pytest.approx(certified["verified_accuracy"])
    assert (counts["verified"] + counts["open"]) / N == pytest.approx(
        certified_report.robust_accuracy
    )
    for record in certified_report.per_sample:
        side, by = record["certified"], record["broken_by"]
        if by == "clean":
            assert side == "misclassified"
        elif by is not None:
            assert side == "attack"
        else:
            assert side in ("verified", "open")
        assert (record["margin_bound"] > 0) == (side == "verified")
    assert certified_report.model_card["verified_acc"] == pytest.approx(
        100 * certified["verified_accuracy"], abs=0.01
    )
    assert "verified accuracy" in certified_report.summary()


def test_smoothing_is_reported_beside_as_the_smoothed_models(certified_report):
    smoothing = certified_report.smoothing
    assert "smoothed model" in smoothing["classifier"]
    assert (smoothing["sigma"], smoothing["n0"], smoothing["n"]) == (0.25, 100, 200)
    accuracy = smoothing["certified_accuracy_l2"]
    assert list(accuracy) == ["0", "0.25", "0.5", "0.75", "1"]
    values = list(accuracy.values())
    assert values == sorted(values, reverse=True) and values[0] > 0.5
    assert values[-1] == 0  # beyond the largest radius 200 samples can certify
    assert smoothing["largest_certifiable_radius"] < 1
    radii = [r["smoothed_radius"] for r in certified_report.per_sample]
    assert max(radii) <= smoothing["largest_certifiable_radius"] + 1e-9
    assert "smoothing" in certified_report.to_dict()


def test_a_point_verified_and_broken_stops_the_evaluation(digits, digits_model, monkeypatch):
    def wrong(model, x, y, threat, method="crown", batch_size=None):
        margins = torch.ones(len(x), 10)  # claims every point is verified
        return Verification(torch.ones(len(x), dtype=torch.bool), margins, method)

    monkeypatch.setattr(sandwich_module, "verify", wrong)
    x, y = digits.test.x[:N], digits.test.y[:N]
    with pytest.raises(AdvtrainError, match=r"point \d+ is verified by crown .* and broken by"):
        advtrain.evaluate(
            digits_model, x, y, eps=0.3, suite="quick", certify=True, diagnostics_points=10
        )


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x > 0.5)


def test_unsupported_layer_and_bad_settings_fail_before_any_attack(digits, monkeypatch):
    def no_attacks(*args, **kwargs):
        raise AssertionError("an attack ran")

    monkeypatch.setattr("advtrain.evaluation.suite._cascade", no_attacks)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), Gate()).eval()
    x, y = digits.test.x[:4], digits.test.y[:4]
    with pytest.raises(AdvtrainError, match=r"inside module .2. \(Gate\)"):
        advtrain.evaluate(model, x, y, eps=0.1, certify=True)
    with pytest.raises(AdvtrainError, match="certify must be"):
        advtrain.evaluate(model, x, y, eps=0.1, certify="alpha-crown")
    with pytest.raises(AdvtrainError, match="smoothing_sigma"):
        advtrain.evaluate(model, x, y, eps=0.1, smoothing_sigma=0)
    with pytest.raises(AdvtrainError, match="l1"):
        advtrain.evaluate(model, x, y, norm="l1", eps=1.0, certify="ibp")


def test_the_page_shows_the_sandwich_and_the_smoothed_model_apart(certified_report, tmp_path):
    page = tmp_path / "report.html"
    certified_report.to_html(page)
    text = page.read_text()
    assert "<h2>Certified robustness</h2>" in text
    assert 'data-metric="certified:verified_accuracy"' in text
    assert 'data-metric="certified:decided_by:open"' in text
    assert "Randomized smoothing: the smoothed model" in text
    assert 'data-metric="smoothing:certified_accuracy_l2:0.5"' in text
