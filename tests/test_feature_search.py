"""Feature search (Square Attack's random search over random feature subsets): it stays in the
threat model whatever the eps, mask, bounds and constraints, lowers the accuracy of a small
XGBoost model, keeps to its query budget and repeats with its seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from advtrain.attacks import FeatureSearch, make_attack
from advtrain.errors import AdvtrainError
from advtrain.models import load_tree_model
from advtrain.threat import ThreatModel

from .test_trees import as_rows, fraud_table, toy_table, xgboost_model

pytest.importorskip("xgboost")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory):
    """A small XGBoost model of the toy table, and 80 rows it was not trained on."""
    x, binary, _ = toy_table(400, seed=1)
    path = Path(tmp_path_factory.mktemp("trees")) / "model.json"
    xgboost_model(x[:320], binary[:320]).save_model(str(path))
    return load_tree_model(path), as_rows(x[320:]), torch.tensor(binary[320:])


class Counting(nn.Module):
    """Counts the rows each forward pass gets."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x: Tensor) -> Tensor:
        self.rows += len(x)
        return self.model(x)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def test_registered_with_typed_options() -> None:
    attack = make_attack("feature-search", eps=0.1, n_queries=10)
    assert isinstance(attack, FeatureSearch) and attack.counts_queries
    with pytest.raises(AdvtrainError, match="has no option 'n_query'"):
        make_attack("feature-search", eps=0.1, n_query=10)
    with pytest.raises(AdvtrainError, match="supports the norms linf, l2"):
        FeatureSearch(norm="l1", eps=1.0)
    with pytest.raises(AdvtrainError, match="p_init"):
        FeatureSearch(eps=0.1, p_init=0.0)


@pytest.mark.parametrize("norm, eps", [("linf", 0.08), ("l2", 0.15)])
def test_lowers_the_accuracy_of_trees_inside_the_ball(trees, norm: str, eps: float) -> None:
    model, x, y = trees
    threat = ThreatModel(norm=norm, eps=eps)
    outcome = FeatureSearch(threat, n_queries=300, seed=0).outcome(model, x, y)
    clean, attacked = accuracy(model, x, y), accuracy(model, outcome.x_adv, y)
    assert attacked <= clean - 0.1
    assert bool(threat.contains(outcome.x_adv, x).all())
    # success is the model's own verdict on the returned points
    assert torch.equal(outcome.success, model(outcome.x_adv).argmax(1) != y)


@pytest.mark.parametrize("restarts", [1, 2])
def test_keeps_to_the_query_budget(trees, restarts: int) -> None:
    model, x, y = trees
    counting = Counting(model)
    n_queries = 40
    outcome = FeatureSearch(
        eps=0.05, n_queries=n_queries, restarts=restarts, seed=0, batch_size=30
    ).outcome(counting, x, y)
    assert outcome.queries is not None
    assert int(outcome.queries.max()) <= restarts * n_queries
    assert int(outcome.queries.min()) >= 1  # the clean check counts
    assert int(outcome.queries.sum()) == counting.rows  # every row a forward pass got counts
    # a point still standing spent its whole budget minus the candidates equal to it
    standing = ~outcome.success
    assert bool((outcome.queries[standing] > n_queries // 2).all())


def test_repeats_with_its_seed_and_stops_on_success(trees) -> None:
    model, x, y = trees
    first = FeatureSearch(eps=0.08, n_queries=100, seed=3).outcome(model, x, y)
    again = FeatureSearch(eps=0.08, n_queries=100, seed=3).outcome(model, x, y)
    assert torch.equal(first.x_adv, again.x_adv) and torch.equal(first.queries, again.queries)
    broken = first.success
    assert bool(broken.any())
    assert bool((first.queries[broken] < 100).any())  # early stop on success


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**16),
    norm=st.sampled_from(["linf", "l2"]),
    eps=st.floats(0.0, 0.6),
    mask_bits=st.integers(0, 2**5 - 1),
    per_feature_bounds=st.booleans(),
)
def test_stays_in_the_threat_model(
    trees, seed: int, norm: str, eps: float, mask_bits: int, per_feature_bounds: bool
) -> None:
    model, x, y = trees
    mask = torch.tensor([bool(mask_bits >> i & 1) for i in range(5)])
    lower: float | Tensor = 0.0
    upper: float | Tensor = 1.0
    if per_feature_bounds:
        g = torch.Generator().manual_seed(seed)
        lower = torch.rand(5, generator=g) * 0.2
        upper = 0.8 + torch.rand(5, generator=g) * 0.2
    rows = x[:24].clamp(torch.as_tensor(lower), torch.as_tensor(upper))
    threat = ThreatModel(norm=norm, eps=eps, mask=mask, lower=lower, upper=upper)
    outcome = FeatureSearch(threat, n_queries=25, seed=seed).outcome(model, rows, y[:24])
    assert bool(threat.contains(outcome.x_adv, rows).all())
    assert bool((outcome.x_adv[:, ~mask] == rows[:, ~mask]).all())
    assert outcome.queries is not None and int(outcome.queries.max()) <= 25


@pytest.mark.parametrize("norm, eps", [("linf", 0.2), ("l2", 0.3)])
def test_constrained_rows_stay_feasible(tmp_path: Path, norm: str, eps: float) -> None:
    z, y, constraints, raw = fraud_table()
    path = tmp_path / "fraud.json"
    xgboost_model(raw[:300], y[:300].numpy()).save_model(str(path))
    model = load_tree_model(path, offset=constraints.offset, scale=constraints.scale)
    threat = ThreatModel(norm=norm, eps=eps, constraints=constraints)
    x, labels = z[300:360], y[300:360]
    outcome = FeatureSearch(threat, n_queries=80, seed=0).outcome(model, x, labels)
    assert bool(constraints.feasible(outcome.x_adv, x).all())
    assert bool(threat.contains(outcome.x_adv, x).all())
    assert bool(outcome.success.any())
    # "verified" may only increase: no row lowers it
    assert bool((outcome.x_adv[:, 4] >= x[:, 4]).all())
    raw_adv = constraints.to_raw(outcome.x_adv)
    assert bool(((raw_adv[:, 2:4] - raw_adv[:, 2:4].round()).abs() < 1e-4).all())
    assert np.isfinite(outcome.loss.numpy()).all()
