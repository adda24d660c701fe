"""The Square attack: threat-model invariants, black-box use of the model, query accounting,
strength on an undefended model, and its schedule and window helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advtrain import ThreatModel
from advtrain.attacks.registry import make_attack
from advtrain.attacks.square import Square
from advtrain.attacks.square_geometry import (
    bump,
    eta,
    p_selection,
    plane_shape,
    window_indices,
    window_mask,
    window_shape,
)
from advtrain.errors import AdvtrainError
from advtrain.evaluation import predict
from advtrain.threat import lp_norm

torch.set_num_threads(1)


def _tiny_model(seed: int, features: int, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


class GradientFree(nn.Module):
    """Wraps a model and fails if it is ever run with autograd on or on a tensor that wants a
    gradient: a black-box attack may only read its outputs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.requires_grad:
            raise AssertionError("the model was queried with autograd on")
        self.calls += 1
        return self.inner(x)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x) == y).float().mean())


# ---------------------------------------------------------------------- threat-model invariants
SHAPES = [(6,), (1, 4, 4), (3, 5, 7), (2, 9), (2, 6, 1)]


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("eps", [0.0, 0.05, 0.5, 3.0])
def test_outputs_stay_inside_the_threat_model(norm, shape, eps):
    g = torch.Generator().manual_seed(len(shape) * 7 + int(eps * 10))
    lower = torch.rand(shape, generator=g) - 0.5
    upper = lower + torch.rand(shape, generator=g) + 0.1
    mask = torch.rand(shape, generator=g) > 0.4
    threat = ThreatModel(norm, eps, lower, upper, mask)
    x = lower + (upper - lower) * torch.rand((7, *shape), generator=g)
    y = torch.randint(0, 3, (7,), generator=g)
    features = int(torch.tensor(shape).prod())
    attack = Square(threat, n_queries=40, seed=1)
    result = attack.outcome(_tiny_model(1, features), x, y)
    x_adv = result.x_adv
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not bool(torch.isnan(x_adv).any())
    assert bool(threat.contains(x_adv, x).all())
    assert torch.equal(x_adv[:, ~mask], x[:, ~mask])  # immutable features exactly unchanged
    assert result.queries.shape == (7,) and bool((result.queries <= 40).all())
    if eps == 0:
        assert torch.equal(x_adv, x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_targeted_and_restarted_runs_stay_inside(norm):
    g = torch.Generator().manual_seed(3)
    threat = ThreatModel(norm, 0.3 if norm == "linf" else 1.0, 0.0, 1.0, None)
    x, y = torch.rand(9, 1, 5, 5, generator=g), torch.randint(0, 4, (9,), generator=g)
    attack = Square(threat, n_queries=30, restarts=3, seed=0)
    result = attack.outcome(_tiny_model(2, 25, 4), x, y, target=(y + 1) % 4)
    assert bool(threat.contains(result.x_adv, x).all())
    assert bool((result.queries <= 3 * 30).all())


def test_unbounded_points_lie_on_the_boundary_of_the_ball():
    """Without the box in the way, linf points sit on a vertex (every feature at ±eps) and l2
    points on the sphere of radius eps, as in the authors' search."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 6, 6, generator=g)
    model = _tiny_model(4, 36)
    y = predict(model, x)  # every point correctly classified: every point is attacked
    x_adv = Square(norm="linf", eps=0.01, lower=-5.0, upper=5.0, n_queries=25, seed=0)(model, x, y)
    assert torch.allclose((x_adv - x).abs(), torch.full_like(x, 0.01), atol=1e-6)
    x_adv = Square(norm="l2", eps=0.05, lower=-5.0, upper=5.0, n_queries=25, seed=0)(model, x, y)
    assert torch.allclose(lp_norm(x_adv - x, "l2"), torch.full((8,), 0.05), atol=1e-6)


def test_empty_and_single_point_batches():
    model = _tiny_model(0, 6)
    attack = Square(eps=0.1, n_queries=10, seed=0)
    out = attack.outcome(model, torch.rand(0, 6), torch.zeros(0, dtype=torch.int64))
    assert out.x_adv.shape == (0, 6) and out.queries.shape == (0,)
    x = torch.rand(1, 6)
    out = attack.outcome(model, x, predict(model, x))
    assert bool(attack.threat.contains(out.x_adv, x).all()) and out.queries.shape == (1,)


# ---------------------------------------------------------------------- black box, queries
def test_never_uses_gradients(digits_model, digits):
    x, y = digits.test.x[:20], digits.test.y[:20]
    for norm, eps in (("linf", 0.3), ("l2", 2.0)):
        model = GradientFree(digits_model)
        x_adv = Square(norm=norm, eps=eps, n_queries=200, seed=0)(model, x, y)
        assert model.calls > 0 and _accuracy(digits_model, x_adv, y) < 0.5
    from advtrain.attacks.pgd import PGD

    with pytest.raises(AssertionError, match="autograd"):  # the check catches a white-box attack
        PGD(eps=0.3, steps=2)(GradientFree(digits_model), x, y)


def test_queries_are_counted_per_point_and_never_exceed_the_budget(digits_model, digits):
    x, y = digits.test.x[:30], digits.test.y[:30]
    wrong = predict(digits_model, x) != y
    attack = Square(eps=0.03, n_queries=60, seed=0)
    model = GradientFree(digits_model)
    result = attack.outcome(model, x, y)
    x_adv, used = result.x_adv, result.queries
    broken = (predict(digits_model, x_adv) != y) & ~wrong
    standing = ~broken & ~wrong
    assert used.dtype == torch.int64 and used.shape == (30,)
    assert bool(standing.any()), "eps too large for this check"
    assert bool((used[wrong] == 1).all())  # the clean check only
    assert bool((used[standing] == 60).all())  # every proposal changes the point: full budget
    assert bool((used[broken] < 60).all())  # left as soon as they were broken
    assert model.calls <= 60  # one forward pass per iteration for all survivors
    # batching and restarts: counts follow their points, the survivors of run 1 run again
    again = Square(eps=0.03, n_queries=60, seed=0, restarts=2, batch_size=7)
    result = again.outcome(digits_model, x, y)
    standing = (predict(digits_model, result.x_adv) == y) & ~wrong
    assert bool(standing.any())
    assert bool((result.queries[standing] == 120).all())
    assert bool((result.queries[wrong] == 1).all())
    assert bool((result.queries <= 120).all())
    assert torch.equal(result.x_adv, again(digits_model, x, y))  # __call__: the same points


def test_two_threads_share_one_attack(digits_model, digits):
    """One Square object called from two threads at once: each call gets its own points and its
    own query counts, the same as when the calls run one after the other."""
    import threading

    attack = Square(eps=0.05, n_queries=80, seed=0, restarts=2)
    inputs = [
        (digits.test.x[:25], digits.test.y[:25]),
        (digits.test.x[25:60], digits.test.y[25:60]),
    ]
    alone = [attack.outcome(digits_model, x, y) for x, y in inputs]
    together: list = [None, None]
    start = threading.Barrier(2)

    def work(k: int) -> None:
        start.wait()
        together[k] = attack.outcome(digits_model, *inputs[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for one, two in zip(alone, together):
        assert torch.equal(one.x_adv, two.x_adv) and torch.equal(one.queries, two.queries)
    assert [len(r.queries) for r in together] == [25, 35]


def test_full_and_window_queries_are_strategies(digits_model, digits):
    """The forward pass is injected: FullQueries never takes the window pass, and the points
    found break the model as well."""
    from advtrain.attacks.square_forward import FullQueries, WindowQueries

    x, y = digits.test.x[:20], digits.test.y[:20]
    full = Square(eps=0.1, n_queries=60, seed=0, forward=FullQueries()).outcome(digits_model, x, y)
    window = Square(eps=0.1, n_queries=60, seed=0, forward=WindowQueries()).outcome(
        digits_model, x, y
    )
    assert full.queries.shape == window.queries.shape == (20,)
    assert abs(int(full.success.sum()) - int(window.success.sum())) <= 2
    with pytest.raises(AdvtrainError, match="forward must be a QueryForward"):
        Square(eps=0.1, forward="window")


def test_points_already_misclassified_are_left_alone(digits_model, digits):
    x, y = digits.test.x, digits.test.y
    wrong = predict(digits_model, x) != y
    assert bool(wrong.any())
    x_adv = Square(eps=0.3, n_queries=50, seed=0)(digits_model, x, y)
    assert torch.equal(x_adv[wrong], x[wrong])


def test_seeded_runs_are_deterministic(digits_model, digits):
    x, y = digits.test.x[:25], digits.test.y[:25]
    for norm, eps in (("linf", 0.05), ("l2", 0.5)):

        def attack(seed: int, norm: str = norm, eps: float = eps) -> torch.Tensor:
            return Square(norm=norm, eps=eps, n_queries=40, seed=seed)(digits_model, x, y)

        first = attack(5)
        assert torch.equal(first, attack(5))
        assert not torch.equal(first, attack(6))


# ---------------------------------------------------------------------- strength
@pytest.mark.parametrize("norm, eps", [("linf", 0.3), ("l2", 2.0)])
def test_breaks_an_undefended_model(digits_model, digits, norm, eps):
    x, y = digits.test.x[:50], digits.test.y[:50]
    assert _accuracy(digits_model, x, y) > 0.9
    attack = Square(norm=norm, eps=eps, n_queries=1000, seed=0)
    x_adv = attack(digits_model, x, y)
    assert _accuracy(digits_model, x_adv, y) <= 0.10
    assert bool(ThreatModel(norm, eps).contains(x_adv, x).all())


def test_more_queries_never_hurt_and_margin_beats_a_tiny_budget(digits_model, digits):
    x, y = digits.test.x[:60], digits.test.y[:60]
    robust = [
        _accuracy(digits_model, Square(eps=0.1, n_queries=q, seed=0)(digits_model, x, y), y)
        for q in (5, 300)
    ]
    assert robust[1] < robust[0]


def test_targeted_runs_hit_their_targets(digits_model, digits):
    x, y = digits.test.x[:40], digits.test.y[:40]
    target = (y + 3) % 10
    x_adv = Square(eps=0.3, n_queries=1000, seed=0)(digits_model, x, y, target=target)
    assert float((predict(digits_model, x_adv) == target).float().mean()) >= 0.9


def test_tabular_inputs_with_immutable_features():
    """(N, D) data with two immutable features: a model that reads the mutable ones is fooled,
    one that reads only an immutable one cannot be, and the immutable features never move."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 10, generator=g)
    y = torch.ones(40, dtype=torch.int64)
    mask = torch.arange(10) >= 2
    mutable_reader = nn.Linear(10, 2)  # class 1 while the mutable features sum above 2
    immutable_reader = nn.Linear(10, 2)  # class 1 while feature 0 is above 0.1
    with torch.no_grad():
        for layer, weights, bias in (
            (mutable_reader, mask.float(), 2.0),
            (immutable_reader, (torch.arange(10) == 0).float(), 0.1),
        ):
            layer.weight.zero_()
            layer.weight[1] = weights
            layer.bias.copy_(torch.tensor([bias, 0.0]))
    for norm, eps in (("linf", 0.7), ("l2", 3.0)):
        threat = ThreatModel(norm, eps, 0.0, 1.0, mask)
        x_adv = Square(threat, n_queries=300, seed=0)(mutable_reader, x, y)
        assert torch.equal(x_adv[:, :2], x[:, :2]) and bool(threat.contains(x_adv, x).all())
        assert _accuracy(mutable_reader, x, y) > 0.8 and _accuracy(mutable_reader, x_adv, y) < 0.2
        x_adv = Square(threat, n_queries=50, seed=0)(immutable_reader, x, y)
        assert torch.equal(x_adv[:, :2], x[:, :2])
        assert _accuracy(immutable_reader, x_adv, y) == _accuracy(immutable_reader, x, y)


# ---------------------------------------------------------------------- schedule and windows
def test_p_schedule_halves_at_the_papers_milestones():
    assert p_selection(0.8, 0, 10000) == 0.8 and p_selection(0.8, 10, 10000) == 0.8
    assert p_selection(0.8, 11, 10000) == 0.4 and p_selection(0.8, 51, 10000) == 0.2
    assert p_selection(0.8, 9999, 10000) == pytest.approx(0.8 / 512)
    assert p_selection(0.8, 6, 5000) == 0.4  # rescaled: iteration 6 of 5000 is 12 of 10,000
    assert p_selection(0.8, 1000, 1000) == pytest.approx(0.8 / 512)


def test_window_sizes_follow_p():
    assert window_shape(0.8, 28, 28, "linf") == (25, 25)
    assert window_shape(0.8 / 512, 28, 28, "linf") == (1, 1)
    assert window_shape(0.8 / 512, 28, 28, "l2") == (3, 3)
    assert window_shape(0.1, 28, 28, "l2") == (9, 9)  # round(8.85) = 9, odd
    assert window_shape(0.25, 28, 28, "l2") == (15, 15)  # 14, made odd
    assert window_shape(1.0, 4, 4, "l2") == (4, 4)  # never larger than the plane
    assert window_shape(0.3, 1, 20, "linf") == (1, 6)  # tabular: a run of round(p * D) features
    assert plane_shape((10,)) == (1, 1, 10) and plane_shape((3, 8, 8)) == (3, 8, 8)
    assert plane_shape((2, 7)) == (2, 1, 7) and plane_shape((2, 7, 1)) == (2, 1, 7)
    with pytest.raises(AdvtrainError, match="Square takes inputs"):
        plane_shape((1, 2, 3, 4))


def test_window_indices_and_masks_agree():
    top, left = torch.tensor([0, 2, 3]), torch.tensor([1, 0, 4])
    c, h, w, size = 2, 5, 7, (2, 3)
    mask, rows, cols = window_mask(top, left, h, w, size)
    flat = torch.zeros(3, c * h * w)
    flat.scatter_(1, window_indices(top, left, (c, h, w), size), 1.0)
    assert torch.equal(flat.reshape(3, c, h, w).bool(), mask.expand(3, c, h, w))
    assert int(mask[1].sum()) == 6 and bool(mask[1, 0, 2:4, 0:3].all())
    assert rows[1].tolist() == [-2, -1, 0, 1, 2] and cols[2, 4] == 0
    run = window_indices(torch.tensor([0]), torch.tensor([3]), (1, 1, 10), (1, 4))
    assert run.tolist() == [[3, 4, 5, 6]]  # 1-D windows are contiguous runs


def test_l2_proposal_shape():
    b = bump(5, 5)
    assert float(b.norm()) == pytest.approx(1.0) and int(b.argmax()) == 12  # peak at the centre
    assert float(b[2, 2]) > float(b[2, 3]) > float(b[2, 4]) > 0
    e = eta(5, 5)
    assert float(e.norm()) == pytest.approx(1.0)
    assert bool((e[:2] > 0).all()) and bool((e[2:] < 0).all())  # + on one half, - on the other
    run = eta(1, 6)
    assert bool((run[0, :3] > 0).all()) and bool((run[0, 3:] < 0).all())


# ---------------------------------------------------------------------- construction
def test_defaults_follow_the_paper():
    attack = Square(eps=0.3)
    assert (attack.n_queries, attack.p_init, attack.loss) == (5000, 0.8, "margin")
    assert attack.restarts == 1
    assert attack.norms == ("linf", "l2")
    assert isinstance(make_attack("square", eps=0.1, n_queries=3), Square)
    assert "n_queries=5000" in repr(attack) and "p_init=0.8" in repr(attack)


def test_ce_loss_also_breaks_the_model(digits_model, digits):
    x, y = digits.test.x[:30], digits.test.y[:30]
    x_adv = Square(eps=0.3, n_queries=500, loss="ce", seed=0)(digits_model, x, y)
    assert _accuracy(digits_model, x_adv, y) <= 0.1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_queries": 0}, "n_queries must be a positive integer"),
        ({"n_queries": 2.5}, "n_queries must be a positive integer"),
        ({"p_init": 0.0}, "p_init must be in"),
        ({"p_init": 1.5}, "p_init must be in"),
        ({"loss": "dlr"}, "unknown loss"),
        ({"norm": "l1"}, "supports the norms"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(AdvtrainError, match=message):
        Square(eps=0.1, **kwargs)
