"""Carlini-Wagner L2: the search over c, minimum norms on a real CNN, the threat model, peers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advtrain.attacks.cw import NO_UPPER_BOUND, CarliniWagnerL2, adversarial_margin, next_const
from advtrain.attacks.registry import make_attack
from advtrain.errors import AdvtrainError
from advtrain.threat import lp_norm

torch.set_num_threads(1)


def _correct_points(digits, model, n: int):
    x, y = digits.test.x[:n], digits.test.y[:n]
    with torch.no_grad():
        keep = model(x).argmax(dim=1) == y
    return x[keep], y[keep]


def test_defaults_follow_carlini_wagner():
    attack = make_attack("cw-l2")
    assert isinstance(attack, CarliniWagnerL2)
    assert (attack.binary_search_steps, attack.steps, attack.lr) == (9, 10000, 0.01)
    assert (attack.initial_const, attack.confidence, attack.abort_early) == (1e-3, 0.0, True)
    assert attack.threat.norm == "l2" and not attack.threat.bounded


def test_binary_search_over_c():
    const = torch.tensor([1e-3, 1e-3, 0.5])
    lower = torch.zeros(3)
    upper = torch.tensor([NO_UPPER_BOUND, NO_UPPER_BOUND, 1.0])
    success = torch.tensor([True, False, False])
    const, lower, upper = next_const(const, lower, upper, success)
    # broken: upper bound 1e-3, c halves towards 0; failed without a known success: c x 10;
    # failed with a known success: midpoint of (0.5, 1.0)
    assert torch.allclose(const, torch.tensor([5e-4, 1e-2, 0.75]))
    assert torch.allclose(lower, torch.tensor([0.0, 1e-3, 0.5]))
    assert torch.allclose(upper, torch.tensor([1e-3, NO_UPPER_BOUND, 1.0]))


def test_margin_sign_convention():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(adversarial_margin(logits, y, None), torch.tensor([-2.0, 2.0]))
    target = torch.tensor([2, 1])
    assert torch.allclose(adversarial_margin(logits, y, target), torch.tensor([-3.0, 1.0]))


def test_exact_on_a_linear_binary_model():
    """For a linear two-class model the minimum L2 distance to the boundary is |margin| / ||w||."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.5, -0.2, 0.1, 0.0, 0.3, -0.4], [0.0] * 6]))
        model[1].bias.zero_()
    x = torch.full((4, 6), 0.5) + torch.linspace(-0.2, 0.2, 4)[:, None] * torch.tensor(
        [1.0, -1.0, 1.0, 0.0, 1.0, -1.0]
    )
    y = model(x).argmax(dim=1)
    logits = model(x)
    exact = (logits[:, 0] - logits[:, 1]).abs() / model[1].weight[0].norm()
    result = CarliniWagnerL2(steps=1000, binary_search_steps=9, lower=-10.0, upper=10.0).min_norm(
        model, x, y
    )
    assert bool(result.success.all())
    exact = exact.detach()
    assert bool((result.norm >= exact * (1 - 1e-4)).all()), (result.norm, exact)  # no shortcut
    assert bool((result.norm <= exact + 0.01).all()), (result.norm, exact)  # close to the optimum


def test_min_norm_breaks_every_correct_point_of_a_cnn(digits, digits_model):
    x, y = _correct_points(digits, digits_model, 24)
    result = CarliniWagnerL2(steps=500, binary_search_steps=6, initial_const=1e-2).min_norm(
        digits_model, x, y
    )
    assert bool(result.success.all())
    assert bool(((result.x_adv >= 0) & (result.x_adv <= 1)).all())
    assert torch.allclose(lp_norm(result.x_adv - x, "l2"), result.norm, atol=1e-5)
    with torch.no_grad():
        assert bool((digits_model(result.x_adv).argmax(dim=1) != y).all())
    assert float(result.norm.median()) < 1.5  # digits live in [0, 1]^64: a small perturbation


def test_targeted_cw_hits_its_targets(digits, digits_model):
    x, y = _correct_points(digits, digits_model, 12)
    target = (y + 3) % 10
    x_adv = CarliniWagnerL2(steps=500, binary_search_steps=6, initial_const=1e-2)(
        digits_model, x, y, target=target
    )
    with torch.no_grad():
        assert bool((digits_model(x_adv).argmax(dim=1) == target).all())


def test_bounded_call_stays_in_the_ball_and_leaves_misclassified_points(digits, digits_model):
    x, y = digits.test.x[:20], digits.test.y[:20]
    with torch.no_grad():
        wrong_label = (digits_model(x).argmax(dim=1) + 1) % 10  # every point "misclassified"
    attack = CarliniWagnerL2(eps=0.5, steps=50, binary_search_steps=2)
    x_adv = attack(digits_model, x, y)
    assert bool(attack.threat.contains(x_adv, x).all())
    assert torch.equal(attack(digits_model, x, wrong_label), x)


def test_immutable_features_and_fixed_bounds_get_no_perturbation(digits, digits_model):
    x, y = _correct_points(digits, digits_model, 10)
    mask = torch.ones(x.shape[1:], dtype=torch.bool)
    mask[..., :4] = False
    result = CarliniWagnerL2(steps=100, binary_search_steps=3, mask=mask).min_norm(
        digits_model, x, y
    )
    assert torch.equal(result.x_adv[..., :4], x[..., :4])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"norm": "linf"}, "supports the norms l2"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"lr": -1.0}, "lr must be a finite number > 0"),
        ({"confidence": float("nan")}, "confidence must be a finite number >= 0"),
        ({"binary_search_steps": 1.5}, "binary_search_steps must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(AdvtrainError, match=message):
        CarliniWagnerL2(**kwargs)


def test_median_l2_no_larger_than_torchattacks_and_art(digits, digits_model):
    """torchattacks' CW has no search over c (500 Adam steps at c = 1 here); ART's has one,
    with a smaller iteration budget (its numpy loop is slow). The median is taken over the
    points both attacks break."""
    torchattacks = pytest.importorskip("torchattacks")
    pytest.importorskip("art")
    from art.attacks.evasion import CarliniL2Method
    from art.estimators.classification import PyTorchClassifier

    x, y = _correct_points(digits, digits_model, 30)
    ours = CarliniWagnerL2(steps=500, binary_search_steps=6, initial_const=1e-2).min_norm(
        digits_model, x, y
    )
    torch.manual_seed(0)
    theirs_ta = torchattacks.CW(digits_model, c=1.0, kappa=0, steps=500, lr=0.01)(x, y)
    classifier = PyTorchClassifier(
        model=digits_model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    art = CarliniL2Method(
        classifier,
        confidence=0.0,
        learning_rate=0.01,
        binary_search_steps=5,
        max_iter=100,
        initial_const=1e-2,
        batch_size=len(x),
        verbose=False,
    )
    theirs_art = torch.from_numpy(art.generate(x.numpy()))
    for theirs in (theirs_ta, theirs_art):
        with torch.no_grad():
            broken = digits_model(theirs).argmax(dim=1) != y
        both = broken & ours.success
        assert int(ours.success.sum()) >= int(broken.sum())
        assert int(both.sum()) >= 5
        theirs_norm = lp_norm(theirs - x, "l2")
        assert float(ours.norm[both].median()) <= float(theirs_norm[both].median()) + 1e-6
