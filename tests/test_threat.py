"""ThreatModel: validation, projection, random starts, ascent directions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advtrain import ThreatModel
from advtrain.errors import ThreatModelError
from advtrain.threat import lp_norm, project_l1_ball

NORMS = ["linf", "l2", "l1"]


def _case(
    seed: int, norm: str, eps: float, shape: tuple[int, ...], per_feature: bool, masked: bool
):
    """A threat model with random bounds/mask, clean inputs inside its bounds, and a wild x_adv."""
    g = torch.Generator().manual_seed(seed)
    if per_feature:
        lower = torch.rand(shape, generator=g) * 2 - 1
        upper = lower + torch.rand(shape, generator=g) * 2
    else:
        lower, upper = torch.tensor(0.0), torch.tensor(1.0)
    mask = (torch.rand(shape, generator=g) > 0.3) if masked else None
    threat = ThreatModel(
        norm, eps, lower if per_feature else 0.0, upper if per_feature else 1.0, mask
    )
    x = lower + (upper - lower) * torch.rand((6, *shape), generator=g)
    x_adv = x + torch.randn((6, *shape), generator=g) * 3 * max(eps, 0.1)
    return threat, x, x_adv


case_args = dict(
    seed=st.integers(0, 2**31 - 1),
    norm=st.sampled_from(NORMS),
    eps=st.floats(0.0, 5.0),
    shape=st.sampled_from([(7,), (1, 5, 5), (3, 4, 4)]),
    per_feature=st.booleans(),
    masked=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(**case_args)
def test_projection_lands_inside_and_is_idempotent(seed, norm, eps, shape, per_feature, masked):
    threat, x, x_adv = _case(seed, norm, eps, shape, per_feature, masked)
    projected = threat.project(x_adv, x)
    assert bool(threat.contains(projected, x).all())
    assert torch.allclose(threat.project(projected, x), projected, atol=1e-5)
    if threat.mask is not None:
        frozen = ~threat.mask.expand_as(x)
        assert torch.equal(projected[frozen], x[frozen])


@settings(max_examples=150, deadline=None)
@given(**case_args)
def test_random_start_lands_inside(seed, norm, eps, shape, per_feature, masked):
    threat, x, _ = _case(seed, norm, eps, shape, per_feature, masked)
    start = threat.random_start(x, torch.Generator().manual_seed(seed))
    assert bool(threat.contains(start, x).all())


@settings(max_examples=100, deadline=None)
@given(**case_args)
def test_ascent_direction_has_unit_norm_on_changeable_features(
    seed, norm, eps, shape, per_feature, masked
):
    threat, x, x_adv = _case(seed, norm, eps, shape, per_feature, masked)
    direction = threat.ascent_direction(x_adv - x)
    norms = lp_norm(direction, norm)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    if threat.mask is not None:
        assert bool((direction[~threat.mask.expand_as(x)] == 0).all())


def test_l1_ascent_leaves_out_coordinates_the_box_blocks():
    threat = ThreatModel("l1", 2.0)
    point = torch.tensor([[1.0, 0.0, 0.5, 0.5]])  # at the upper bound, at the lower, inside, inside
    grad = torch.tensor([[9.0, -8.0, 0.1, -0.2]])  # the two largest push out of the box
    free = threat.ascent_direction(grad)
    boxed = threat.ascent_direction(grad, point)
    assert free[0, 0] == 1.0  # without the point, the whole step goes where it cannot move
    assert boxed.tolist() == [[0.0, 0.0, 0.0, -1.0]]  # the largest coordinate that can move
    # without the point, a step from a point pinned against the box is projected straight back
    stuck = threat.project(point + threat.ascent_direction(grad), point)
    assert torch.equal(stuck, point)


def test_contains_rejects_each_kind_of_violation():
    threat = ThreatModel("l2", 0.5, 0.0, 1.0, mask=torch.tensor([True, True, False]))
    x = torch.full((1, 3), 0.5)
    assert bool(threat.contains(x, x).all())
    assert not bool(threat.contains(x + torch.tensor([[0.4, 0.4, 0.0]]), x).all())  # outside ball
    assert not bool(threat.contains(x + torch.tensor([[0.0, 0.0, 0.1]]), x).all())  # frozen feature
    assert not bool(threat.contains(torch.tensor([[0.5, -0.1, 0.5]]), x).all())  # outside bounds


def test_inside_point_is_unchanged_by_projection():
    threat = ThreatModel("linf", 0.3)
    x = torch.full((2, 4), 0.5)
    inside = x + 0.2
    assert torch.equal(threat.project(inside, x), inside)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0.01, 3.0), d=st.integers(1, 20))
def test_l1_projection_is_the_euclidean_projection(seed, eps, d):
    """Check the optimality conditions: w = sign(v) * max(|v| - theta, 0) with ||w||_1 = eps."""
    v = torch.randn((1, d), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    w = project_l1_ball(v, eps)
    if float(v.abs().sum()) <= eps:
        assert torch.equal(w, v)
        return
    assert float(w.abs().sum()) == pytest.approx(eps, rel=1e-9)
    moved = v.abs() - w.abs()
    support = w != 0
    theta = moved[support]
    assert torch.allclose(theta, theta[0].expand_as(theta))  # the same shrinkage on the support
    assert bool((v.abs()[~support] <= theta[0] + 1e-12).all())  # the rest was below the threshold
    assert bool((torch.sign(w[support]) == torch.sign(v[support])).all())


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_random_start_is_uniform_in_the_ball(norm):
    """In 2-D a uniform point of the ball lies in the half-radius ball with probability 1/4."""
    threat = ThreatModel(norm, 1.0, -10.0, 10.0)
    x = torch.zeros((40_000, 2))
    start = threat.random_start(x, torch.Generator().manual_seed(0))
    inner = float((lp_norm(start, norm) <= 0.5).float().mean())
    assert inner == pytest.approx(0.25, abs=0.015)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(eps=-0.1), "eps must be >= 0"),
        (dict(eps=float("nan")), "eps must be >= 0"),
        (dict(eps="big"), "eps must be a number"),
        (dict(norm="l3"), "unknown norm"),
        (dict(lower=1.0, upper=0.0), "lower bound must be <= upper"),
        (dict(lower=torch.zeros(3), upper=torch.ones(4)), "does not match"),
        (dict(lower=float("nan")), "must be finite"),
        (dict(mask=[True, False]), "mask must be a tensor"),
    ],
)
def test_invalid_threat_models_raise_one_line_errors(kwargs, message):
    with pytest.raises(ThreatModelError, match=message) as info:
        ThreatModel(**kwargs)
    assert "\n" not in str(info.value)


def test_validate_checks_inputs_against_bounds_and_shapes():
    threat = ThreatModel("linf", 0.1, torch.zeros(3), torch.ones(3))
    threat.validate(torch.full((2, 3), 0.5))
    with pytest.raises(ThreatModelError, match="outside the threat model's bounds"):
        threat.validate(torch.full((2, 3), 2.0))
    with pytest.raises(ThreatModelError, match="does not fit inputs"):
        threat.validate(torch.full((2, 4), 0.5))
    with pytest.raises(ThreatModelError, match="NaN"):
        threat.validate(torch.tensor([[0.5, math.nan, 0.5]]))


def test_replace_revalidates():
    threat = ThreatModel("linf", 0.1)
    assert threat.replace(eps=0.2).eps == 0.2
    with pytest.raises(ThreatModelError):
        threat.replace(eps=-1.0)
