"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019) on a linear classifier whose smoothed
probabilities are known in closed form.

Two classes, logits ``(0, w·x + b)``: under ``x + N(0, sigma^2 I)`` the margin ``w·x + b`` is
``N(w·x + b, sigma^2 ||w||^2)``, so the top class has probability
``p_A = Phi(|w·x + b| / (sigma ||w||))`` and the exact smoothed radius ``sigma * Phi^-1(p_A)``
is the distance ``|w·x + b| / ||w||`` to the hyperplane.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from advtrain.certify import (
    ABSTAIN,
    Certificate,
    Smoothed,
    SmoothingSettings,
    certified_accuracy,
    clopper_pearson_lower,
    max_certifiable_radius,
    write_certified_accuracy_curve,
)
from advtrain.errors import AdvtrainError

SIGMA = 0.25
W = torch.tensor([3.0, 4.0, 0.0, 0.0])  # ||w|| = 5
#: Signed distances to the hyperplane w·x = 0 of the test points (0: on it).
DISTANCES = (0.1, 0.3, 0.5, -0.3, 0.0)


def linear_model() -> nn.Module:
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[1] = W
        layer.bias.zero_()
    return layer


def points(distances=DISTANCES) -> torch.Tensor:
    unit = W / W.norm()
    return torch.stack([d * unit + torch.tensor([0.0, 0.0, 0.2, 0.7]) for d in distances])


def true_p_a(distance: float) -> float:
    return float(stats.norm.cdf(abs(distance) / SIGMA))


def test_certify_bounds_the_true_probability_and_gives_the_radius_of_its_bound():
    n, alpha = 2000, 0.001
    result = Smoothed(linear_model(), SIGMA, seed=1).certify(points(), n0=100, n=n, alpha=alpha)
    assert isinstance(result, Certificate) and len(result) == len(DISTANCES)
    assert result.counts.sum(dim=1).tolist() == [n] * len(DISTANCES)
    assert result.selection_counts.sum(dim=1).tolist() == [100] * len(DISTANCES)
    for i, d in enumerate(DISTANCES):
        if d == 0:
            continue
        assert int(result.prediction[i]) == (1 if d > 0 else 0)
        p_a = true_p_a(d)
        n_a = int(result.counts[i, int(result.prediction[i])])
        upper = stats.beta.ppf(1 - alpha, n_a + 1, n - n_a)
        assert float(result.pA_lower[i]) <= p_a <= upper  # the truth lies in the interval
        expected = SIGMA * stats.norm.ppf(float(result.pA_lower[i]))
        assert float(result.radius[i]) == pytest.approx(expected, abs=1e-12)
        assert 0 < float(result.radius[i]) < abs(d)
    assert result.settings == SmoothingSettings("certify", SIGMA, 100, n, alpha, 1000, 1, 2)


def test_certify_with_many_samples_reaches_the_analytic_radius():
    result = Smoothed(linear_model(), SIGMA, batch_size=20_000).certify(
        points(DISTANCES[:4]), n=200_000
    )
    for i, d in enumerate(DISTANCES[:4]):
        assert float(result.radius[i]) == pytest.approx(abs(d), abs=0.01)
        assert float(result.radius[i]) <= abs(d)


def test_a_point_on_the_hyperplane_is_abstained_on_by_predict_and_certify():
    x = points((0.0, 0.5))
    smoothed = Smoothed(linear_model(), SIGMA, seed=2)
    certificate = smoothed.certify(x, n0=100, n=1000)
    assert certificate.abstained.tolist() == [True, False]
    assert int(certificate.prediction[0]) == ABSTAIN and float(certificate.radius[0]) == 0.0
    assert float(certificate.pA_lower[0]) < 0.5
    prediction = smoothed.predict(x, n=1000)
    assert prediction.abstained.tolist() == [True, False]
    assert prediction.prediction.tolist() == [ABSTAIN, 1]
    assert float(prediction.p_value[0]) > 0.001 > float(prediction.p_value[1])
    assert prediction.counts.sum(dim=1).tolist() == [1000, 1000]


def test_results_repeat_exactly_with_the_seed_whatever_the_batching():
    x = points()

    def counts(seed: int, batch_size: int) -> torch.Tensor:
        return (
            Smoothed(linear_model(), SIGMA, batch_size=batch_size, seed=seed)
            .certify(x, n0=30, n=300)
            .counts
        )

    assert torch.equal(counts(5, 64), counts(5, 64))
    assert not torch.equal(counts(5, 64), counts(6, 64))
    for batch_size in (7, 300, 10_000):  # a point over several batches; several per batch
        assert counts(5, batch_size).sum(dim=1).tolist() == [300] * len(DISTANCES)


def test_the_model_runs_in_eval_mode_and_gets_its_mode_back():
    seen = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = linear_model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((self.training, torch.is_grad_enabled(), float(x.min())))
            return self.inner(x)

    model = Probe().train()
    Smoothed(model, 2.0).predict(torch.zeros(3, 4), n=50)
    assert model.training and model.inner.training
    assert all(not training and not grad for training, grad, _ in seen)
    assert min(low for *_, low in seen) < 0  # the noise is not clipped to [0, 1]


def test_clopper_pearson_is_scipys_exact_interval_at_twice_alpha():
    n, alpha = 1000, 0.001
    ks = np.array([0, 1, 37, 500, 999, 1000])
    ours = clopper_pearson_lower(ks, n, alpha)
    for k, value in zip(ks, ours):
        ci = stats.binomtest(int(k), n).proportion_ci(
            confidence_level=1 - 2 * alpha, method="exact"
        )
        assert value == pytest.approx(ci.low, abs=1e-12)
    try:  # the reference code's function, where statsmodels is installed
        from statsmodels.stats.proportion import proportion_confint
    except ImportError:
        return
    for k, value in zip(ks, ours):
        low = proportion_confint(int(k), n, alpha=2 * alpha, method="beta")[0]
        assert value == pytest.approx(0.0 if math.isnan(low) else low, abs=1e-12)


def test_max_certifiable_radius_is_sigma_phi_inverse_of_alpha_to_the_one_over_n():
    expected = 0.25 * stats.norm.ppf(0.001 ** (1 / 100_000))
    assert max_certifiable_radius(0.25, 100_000, 0.001) == pytest.approx(expected)
    assert 0.95 < expected < 0.96


@pytest.mark.parametrize(
    ("build", "call", "needle"),
    [
        ({"sigma": 0.0}, {}, "sigma"),
        ({"sigma": -1.0}, {}, "sigma"),
        ({"sigma": float("nan")}, {}, "sigma"),
        ({"batch_size": 0}, {}, "batch_size"),
        ({}, {"n0": 0}, "n0"),
        ({}, {"n": 0}, "n"),
        ({}, {"alpha": 0.0}, "alpha"),
        ({}, {"alpha": 1.0}, "alpha"),
        ({}, {"x": torch.full((1, 4), float("nan"))}, "NaN"),
        ({}, {"x": torch.zeros(0, 4)}, "no points"),
    ],
)
def test_bad_input_is_a_one_line_error(build, call, needle):
    call = dict(call)
    x = call.pop("x", points((0.3,)))
    call.setdefault("n", 10)
    with pytest.raises(AdvtrainError) as info:
        Smoothed(linear_model(), **{"sigma": SIGMA, **build}).certify(x, **call)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_a_model_without_class_logits_is_refused():
    with pytest.raises(AdvtrainError, match=r"logits \(B, C\)"):
        Smoothed(nn.Flatten(0), SIGMA).predict(torch.zeros(2, 4), n=5)


def _hand_made(prediction, radius, abstained) -> Certificate:
    n = len(prediction)
    return Certificate(
        prediction=torch.tensor(prediction),
        radius=torch.tensor(radius, dtype=torch.float64),
        abstained=torch.tensor(abstained),
        counts=torch.zeros(n, 2, dtype=torch.int64),
        selection_counts=torch.zeros(n, 2, dtype=torch.int64),
        pA_lower=torch.zeros(n, dtype=torch.float64),
        settings=SmoothingSettings("certify", SIGMA, 1, 1, 0.001, 1, 0, 2),
    )


def test_certified_accuracy_counts_correct_points_certified_at_each_radius(tmp_path):
    certificate = _hand_made([1, 0, ABSTAIN, 1], [0.3, 0.6, 0.0, 0.0], [False, False, True, False])
    y = torch.tensor([1, 1, 0, 1])
    figures = certified_accuracy(certificate, y, radii=(0.0, 0.25, 0.3, 0.5))
    assert figures.accuracy == (0.5, 0.25, 0.25, 0.0)
    assert figures.abstained == 0.25 and figures.n_points == 4
    assert figures.rows()[1] == {"radius": 0.25, "accuracy": 0.25}
    table = figures.table().splitlines()
    assert len(table) == 2 + 4 and table[-1].split() == ["0.50", "0.00%"]
    with pytest.raises(AdvtrainError, match="labels"):
        certified_accuracy(certificate, y[:3])
    with pytest.raises(AdvtrainError, match="radii"):
        certified_accuracy(certificate, y, radii=(-1.0,))
    path = write_certified_accuracy_curve({"hand-made": (certificate, y)}, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
