"""Square's give-up rule (advtrain.attacks.GiveUp): which points it drops, that what it returns
stays a valid result, and where the suites use it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from advtrain import ThreatModel
from advtrain.attacks import APGD, APGDT, GiveUp, Square
from advtrain.attacks.give_up import APGD_FACTOR, hopeless_descent
from advtrain.device_sync import compact_every
from advtrain.errors import AdvtrainError
from advtrain.evaluation import predict
from advtrain.evaluation.escalation import RULES
from advtrain.evaluation.steps import suite_attacks
from advtrain.losses import cw_margin

torch.set_num_threads(1)

#: A rule that judges early and gives up easily, so that tiny runs drop points.
EAGER = GiveUp(checkpoints=(0.2, 0.4, 0.6), window=0.5, factor=0.5)


def _tiny_model(seed: int, features: int, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


def test_the_watch_drops_flat_far_points_and_keeps_moving_ones():
    watch = GiveUp(checkpoints=(0.5,), window=0.5, factor=2.0).watch(100, 4, torch.device("cpu"))
    assert watch.checks == {50: 25}
    index = torch.arange(4)
    active = torch.tensor([True, True, True, False])
    start = torch.tensor([-5.0, -5.0, -0.5, -5.0])
    assert watch.after(25, index, start, active) is None  # kept, not judged
    # at 50: ln(100/50)/ln(50/25) = 1, so the gain to come is the gain so far
    now = torch.tensor([-4.9, -2.0, -0.3, -4.9])
    hopeless = watch.after(50, index, now, active)
    assert hopeless is not None
    # far and flat: given up; far but moving fast, or near and moving: kept; inactive: never
    assert hopeless.tolist() == [True, False, False, False]


def test_the_watch_follows_rows_after_points_leave():
    watch = GiveUp(checkpoints=(0.5,), window=0.5, factor=2.0).watch(100, 3, torch.device("cpu"))
    watch.after(25, torch.arange(3), torch.tensor([-5.0, -1.0, -5.0]), torch.ones(3, dtype=bool))
    rows = torch.tensor([0, 2])  # point 1 left the search (broken)
    hopeless = watch.after(50, rows, torch.tensor([-1.0, -4.9]), torch.ones(2, dtype=bool))
    assert hopeless is not None and hopeless.tolist() == [False, True]


def test_square_gives_up_on_points_it_cannot_break(digits_model, digits):
    x, y = digits.test.x[:40], digits.test.y[:40]
    threat = ThreatModel("linf", 0.02)
    full = Square(threat, n_queries=300, seed=0).outcome(digits_model, x, y)
    kept = Square(threat, n_queries=300, seed=0, give_up=GiveUp()).outcome(digits_model, x, y)
    assert full.queries is not None and kept.queries is not None
    standing = ~kept.success & (predict(digits_model, x) == y)
    assert bool(standing.any())
    dropped = standing & (kept.queries < 300)
    assert int(dropped.sum()) >= 5, "far points should be given up"
    assert int(kept.queries.sum()) < int(full.queries.sum())
    assert bool(threat.contains(kept.x_adv, x).all())
    # a given-up point's result is its best point: not adversarial, and its loss is its margin
    with torch.no_grad():
        margin = cw_margin(digits_model(kept.x_adv), y)
    assert bool((margin[dropped] < 0).all())
    assert torch.allclose(kept.loss[dropped], margin[dropped], atol=1e-5)
    assert torch.equal(kept.success, predict(digits_model, kept.x_adv) != y)


def test_nothing_changes_before_the_first_checkpoint(digits_model, digits):
    """Points broken early are broken the same way: the rule only acts at its checkpoints."""
    x, y = digits.test.x[:30], digits.test.y[:30]
    threat = ThreatModel("linf", 0.3)
    full = Square(threat, n_queries=2000, seed=3).outcome(digits_model, x, y)
    first = round(GiveUp().checkpoints[0] * 2000)
    assert full.queries is not None and int(full.queries.max()) < first  # all broken by then
    kept = Square(threat, n_queries=2000, seed=3, give_up=GiveUp()).outcome(digits_model, x, y)
    assert torch.equal(full.x_adv, kept.x_adv) and torch.equal(full.queries, kept.queries)


def test_targeted_runs_spend_every_query(digits_model, digits):
    x, y = digits.test.x[:10], digits.test.y[:10]
    threat = ThreatModel("linf", 0.01)
    target = (y + 1) % 10
    result = Square(threat, n_queries=50, seed=0, give_up=EAGER).outcome(
        digits_model, x, y, target=target
    )
    assert result.queries is not None
    standing = ~result.success & (predict(digits_model, x) == y)
    assert bool(standing.any()) and bool((result.queries[standing] == 50).all())


@settings(max_examples=40, deadline=None)
@given(
    norm=st.sampled_from(["linf", "l2"]),
    eps=st.floats(0.0, 3.0),
    shape=st.sampled_from([(6,), (1, 4, 4), (3, 5, 5)]),
    masked=st.booleans(),
    restarts=st.integers(1, 2),
    seed=st.integers(0, 2**16),
    accelerator_path=st.booleans(),
)
def test_given_up_points_stay_inside_the_threat_model(
    norm, eps, shape, masked, restarts, seed, accelerator_path
):
    g = torch.Generator().manual_seed(seed)
    lower = torch.rand(shape, generator=g) - 0.5
    upper = lower + torch.rand(shape, generator=g) + 0.1
    mask = torch.rand(shape, generator=g) > 0.4 if masked else None
    threat = ThreatModel(norm, eps, lower, upper, mask)
    x = lower + (upper - lower) * torch.rand((6, *shape), generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    model = _tiny_model(seed, int(torch.tensor(shape).prod()))
    attack = Square(threat, n_queries=30, restarts=restarts, seed=seed, give_up=EAGER)
    with compact_every(5 if accelerator_path else 1):
        result = attack.outcome(model, x, y)
    assert bool(threat.contains(result.x_adv, x).all())
    assert result.queries is not None and bool((result.queries <= 30 * restarts).all())
    assert torch.equal(result.success, predict(model, result.x_adv) != y)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"checkpoints": ()}, "increasing fractions"),
        ({"checkpoints": (0.5, 0.2)}, "increasing fractions"),
        ({"checkpoints": (0.5, 1.0)}, "increasing fractions"),
        ({"window": 0.0}, "window must be in"),
        ({"window": 1.0}, "window must be in"),
        ({"factor": 0.0}, "factor must be positive"),
        ({"factor": float("inf")}, "factor must be positive"),
    ],
)
def test_bad_rules(kwargs, message):
    with pytest.raises(AdvtrainError, match=message):
        GiveUp(**kwargs)


def test_square_refuses_a_rule_it_cannot_use():
    with pytest.raises(AdvtrainError, match="margin loss"):
        Square(eps=0.1, loss="ce", give_up=GiveUp())
    with pytest.raises(AdvtrainError, match="must be a GiveUp"):
        Square(eps=0.1, give_up="yes")  # type: ignore[arg-type]


def test_the_suites_give_up_only_in_their_own_square():
    threat = ThreatModel("linf", 0.3)
    for suite in ("quick", "standard", "thorough"):
        squares = {
            s.name: s.attack
            for s in suite_attacks(suite, threat, 10, seed=0)
            if isinstance(s.attack, Square)
        }
        assert isinstance(squares["square"].give_up, GiveUp)
        l2 = suite_attacks(suite, threat.replace(norm="l2", eps=1.0), 10, seed=0)
        assert [s.attack.give_up for s in l2 if s.name == "square"] == [None]  # type: ignore[attr-defined]
        if suite == "thorough":
            assert squares["square 10k x2"].give_up is None
    # the escalations' Square runs (masking, second run) spend every query
    ctx = SimpleNamespace(threat=threat, batch_size=None, n_classes=10)
    built = [planned.build(ctx).attack for rule in RULES for planned in rule.steps]  # type: ignore[arg-type]
    escalation_squares = [a for a in built if isinstance(a, Square)]
    assert len(escalation_squares) == 2
    assert all(a.give_up is None for a in escalation_squares)


# ---------------------------------------------------------------------- APGD's rule
def test_hopeless_descent_judges_the_gain_since_the_start():
    best = torch.tensor([-0.9, -0.3, -0.9, 0.1])
    start = torch.tensor([-0.91, -0.7, -1.0, -0.5])
    # after 20 of 100 iterations the gain to come is 4x the gain so far
    hopeless = hopeless_descent(best, start, done=20, steps=100, factor=8.0)
    # flat and far: given up; moving: kept (0.4 * 4 * 8 > 0.3); far with a fair gain: kept
    # (0.1 * 4 * 8 > 0.9); already past zero: never
    assert hopeless.tolist() == [True, False, False, False]


class _Passes(nn.Module):
    """Counts the images a model sees with autograd on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.images = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x) if torch.is_grad_enabled() else 0
        return self.inner(x)


def test_apgd_t_gives_up_without_losing_what_it_breaks(digits_model, digits):
    x, y = digits.test.x[:60], digits.test.y[:60]
    threat = ThreatModel("linf", 0.05)
    runs = {}
    for give_up in (None, APGD_FACTOR):
        model = _Passes(digits_model)
        x_adv = APGDT(threat, n_targets=3, give_up=give_up, seed=0)(model, x, y)
        assert bool(threat.contains(x_adv, x).all())
        runs[give_up] = (predict(digits_model, x_adv) != y, model.images)
    (full, full_images), (kept, kept_images) = runs[None], runs[APGD_FACTOR]
    assert bool(full.any()) and bool((~full).any())
    assert torch.equal(full, kept)
    assert kept_images < 0.8 * full_images


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"give_up": 0.0}, "positive and finite"),
        ({"give_up": float("inf")}, "positive and finite"),
        ({"give_up": "8"}, "positive number or None"),
        ({"give_up": 8.0, "loss": "ce"}, "zero is the boundary"),
    ],
)
def test_apgd_refuses_a_bad_give_up(kwargs, message):
    with pytest.raises(AdvtrainError, match=message):
        APGD(eps=0.1, **kwargs)


def test_the_suites_apgd_t_gives_up_and_the_escalations_do_not():
    threat = ThreatModel("linf", 0.3)
    for suite in ("quick", "standard", "thorough"):
        steps = {s.name: s.attack for s in suite_attacks(suite, threat, 10, seed=0)}
        assert steps["apgd-t"].give_up == APGD_FACTOR  # type: ignore[attr-defined]
        l2 = {s.name: s.attack for s in suite_attacks(suite, threat.replace(norm="l2"), 10, 0)}
        assert l2["apgd-t"].give_up is None  # type: ignore[attr-defined]
        assert steps["apgd-ce"].give_up is None  # type: ignore[attr-defined]
        if suite == "thorough":
            assert steps["apgd-t all"].give_up is None  # type: ignore[attr-defined]
    ctx = SimpleNamespace(threat=threat, batch_size=None, n_classes=10)
    built = [planned.build(ctx).attack for rule in RULES for planned in rule.steps]  # type: ignore[arg-type]
    assert all(getattr(a, "give_up", None) is None for a in built)
