"""DeepFool: exact on linear models, small margins on a real CNN, inside the threat model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advtrain.attacks.base import frozen
from advtrain.attacks.deepfool import DeepFool
from advtrain.attacks.registry import make_attack
from advtrain.errors import AdvtrainError
from advtrain.threat import lp_norm

torch.set_num_threads(1)


def _linear(features: int, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, classes)).eval()


def _points(digits, digits_model, n: int = 30):
    x, y = digits.test.x[:n], digits.test.y[:n]
    with torch.no_grad():
        correct = digits_model(x).argmax(dim=1) == y
    return x, y, correct


def test_defaults_follow_the_paper_and_the_registry():
    attack = make_attack("deepfool")
    assert isinstance(attack, DeepFool)
    assert (attack.steps, attack.overshoot, attack.candidates) == (50, 0.02, 10)
    assert attack.threat.norm == "linf" and not attack.threat.bounded
    assert DeepFool(norm="l2").threat.norm == "l2"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"overshoot": -0.1}, "overshoot must be finite and >= 0"),
        ({"candidates": 1}, "candidates must be at least 2"),
        ({"norm": "l1"}, "supports the norms l2, linf, not l1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(AdvtrainError, match=message):
        DeepFool(**kwargs)


@pytest.mark.parametrize("norm, dual", [("l2", 2.0), ("linf", 1.0)])
def test_one_step_reaches_the_nearest_boundary_of_a_linear_model(norm, dual):
    """For an affine classifier the margin is min_k |f_k - f_y| / ||w_k - w_y||_q, and DeepFool
    lands (1 + overshoot) times (that + 1e-4) away, in a single step."""
    model = _linear(6, 4, seed=0)
    x = torch.rand(20, 6) * 2 - 1
    with torch.no_grad():
        y = model(x).argmax(dim=1)
        logits = model(x)
    weight = model[1].weight
    gaps = (logits - logits.gather(1, y[:, None])).abs()
    normals = (weight[None] - weight[y][:, None]).norm(p=dual, dim=2)
    margin = (gaps / normals).masked_fill(gaps == 0, float("inf")).amin(dim=1)
    result = DeepFool(norm=norm, steps=1, lower=-100.0, upper=100.0).min_norm(model, x, y)
    assert bool(result.success.all())
    torch.testing.assert_close(result.norm, 1.02 * (margin + 1e-4), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm, largest_median", [("l2", 0.9), ("linf", 0.2)])
def test_breaks_every_point_of_the_digits_cnn_with_small_norms(
    digits, digits_model, norm, largest_median
):
    x, y, correct = _points(digits, digits_model)
    result = DeepFool(norm=norm).min_norm(digits_model, x, y)
    assert bool(result.success.all())
    assert bool(torch.isfinite(result.x_adv).all())
    with torch.no_grad():
        assert bool((digits_model(result.x_adv).argmax(dim=1) != y).all())
    torch.testing.assert_close(result.norm, lp_norm(result.x_adv - x, norm))
    assert bool((result.norm[~correct] == 0).all())  # misclassified points are returned as is
    median = float(result.norm[correct].median())
    assert 0 < median < largest_median
    assert bool(((result.x_adv >= 0) & (result.x_adv <= 1)).all())


def test_targeted_reaches_its_targets(digits, digits_model):
    x, y, _ = _points(digits, digits_model, 20)
    target = (y + 3) % 10
    for norm in ("l2", "linf"):
        result = DeepFool(norm=norm).min_norm(digits_model, x, y, target=target)
        with torch.no_grad():
            predicted = digits_model(result.x_adv).argmax(dim=1)
        assert bool(result.success.all()) and torch.equal(predicted, target)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_finite_eps_stays_inside_the_threat_model_and_keeps_what_fits(digits, digits_model, norm):
    x, y, _ = _points(digits, digits_model)
    eps = 0.6 if norm == "l2" else 0.1
    attack = DeepFool(norm=norm, eps=eps)
    x_adv = attack(digits_model, x, y)
    assert bool(attack.threat.contains(x_adv, x).all())
    margin = DeepFool(norm=norm).min_norm(digits_model, x, y).norm
    with torch.no_grad():
        fooled = digits_model(x_adv).argmax(dim=1) != y
    assert bool(fooled[margin <= eps].all())  # deterministic: kept when it fits in the ball
    assert 0 < int((margin <= eps).sum()) < len(x)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_mask_and_per_feature_bounds_on_tabular_data(norm):
    """The step itself (not only the base's clean-up) never moves immutable features nor leaves
    the per-feature box."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    lower = -torch.rand(8)
    upper = torch.rand(8) + 0.2
    mask = torch.tensor([True, False, True, True, False, True, True, False])
    x = lower + (upper - lower) * torch.rand(40, 8)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    attack = DeepFool(norm=norm, lower=lower, upper=upper, mask=mask)
    with frozen(model):
        found = attack.minimize(model, x, y, None, None)
    assert torch.equal(found[:, ~mask], x[:, ~mask])
    assert bool(((found >= lower) & (found <= upper)).all())
    result = attack.min_norm(model, x, y)
    assert int(result.success.sum()) >= 32  # of 40: clipping at the box stalls a few points
    bounded = DeepFool(norm=norm, eps=0.2, lower=lower, upper=upper, mask=mask)
    assert bool(bounded.threat.contains(bounded(model, x, y), x).all())


def test_deterministic_and_independent_of_batching(digits, digits_model):
    x, y, _ = _points(digits, digits_model, 20)
    whole = DeepFool(norm="l2").min_norm(digits_model, x, y)
    again = DeepFool(norm="l2").min_norm(digits_model, x, y)
    batched = DeepFool(norm="l2", batch_size=7).min_norm(digits_model, x, y)
    assert torch.equal(whole.x_adv, again.x_adv)
    torch.testing.assert_close(batched.norm, whole.norm, rtol=1e-4, atol=1e-6)


def test_a_flat_model_gives_no_nan():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    x = torch.rand(5, 4)
    y = torch.zeros(5, dtype=torch.long)  # argmax of tied logits
    for norm in ("l2", "linf"):
        result = DeepFool(norm=norm, steps=3).min_norm(model, x, y)
        assert torch.equal(result.x_adv, x) and bool(torch.isinf(result.norm).all())


def test_median_l2_no_larger_than_torchattacks_deepfool(digits, digits_model):
    torchattacks = pytest.importorskip("torchattacks")
    x, y, correct = _points(digits, digits_model, 30)
    ours = DeepFool(norm="l2", steps=50, overshoot=0.02).min_norm(digits_model, x, y)
    theirs_x = torchattacks.DeepFool(digits_model, steps=50, overshoot=0.02)(x, y)
    with torch.no_grad():
        theirs_success = digits_model(theirs_x).argmax(dim=1) != y
    both = correct & ours.success & theirs_success
    assert int(ours.success[correct].sum()) >= int(theirs_success[correct].sum())
    assert int(both.sum()) >= 5
    theirs_norm = lp_norm(theirs_x - x, "l2")
    assert float(ours.norm[both].median()) <= float(theirs_norm[both].median()) * 1.001 + 1e-6
