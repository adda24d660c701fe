"""HopSkipJump: decision-based (labels only), minimum norm, within its query budget."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

from advtrain.attacks.hop_skip_jump import HopSkipJump, LabelOracle
from advtrain.attacks.registry import make_attack
from advtrain.errors import AdvtrainError
from advtrain.threat import ThreatModel, lp_norm

torch.set_num_threads(1)


class Logits(torch.Tensor):
    """Logits that log every function applied to them (its results are plain tensors)."""

    log: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.log.append(getattr(func, "__name__", str(func)))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class NoGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("a gradient was asked of the model")


class Spy(nn.Module):
    """Wraps a model: counts the inputs it sees, refuses gradients, hands out logging logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0
        self.grad_enabled: set[bool] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        self.grad_enabled.add(torch.is_grad_enabled() or x.requires_grad)
        return NoGrad.apply(self.model(x)).as_subclass(Logits)


LOWER = torch.tensor([0.0, -1.0, 0.0, 2.0, -0.5, 0.0])
UPPER = torch.tensor([1.0, 1.0, 5.0, 3.0, 0.5, 0.1])
MASK = torch.tensor([True, True, False, True, False, True])


def linear_model(d: int = 6, classes: int = 3) -> nn.Linear:
    """A linear classifier of tabular points whose decision the mutable features can flip."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Linear(d, classes)
    with torch.no_grad():
        model.weight.copy_(torch.randn(classes, d, generator=generator) * 3)
        model.weight[:, ~MASK] *= 0.1
        model.bias.copy_(-(model.weight @ ((LOWER + UPPER) / 2)))
    return model.eval()


@pytest.fixture(scope="module")
def points(digits, digits_model):
    """20 test digits the model classifies correctly."""
    x, y = digits.test.x[:24], digits.test.y[:24]
    with torch.no_grad():
        right = digits_model(x).argmax(1) == y
    return x[right][:20], y[right][:20]


def test_registered_defaults_and_bad_arguments():
    attack = make_attack("hsj")
    assert isinstance(attack, HopSkipJump)
    defaults = (attack.steps, attack.init_evals, attack.max_evals, attack.gamma, attack.n_queries)
    assert defaults == (40, 100, 10_000, 1.0, 25_000)
    assert attack.threat.norm == "l2" and not attack.threat.bounded
    assert HopSkipJump(norm="linf", eps=0.1).threat.eps == 0.1
    for bad in (
        {"steps": 0},
        {"n_queries": -1},
        {"init_evals": 200, "max_evals": 100},
        {"gamma": 0.0},
        {"norm": "l1"},
        {"query_batch_size": 1.5},
    ):
        with pytest.raises(AdvtrainError):
            HopSkipJump(**bad)
    x, y = torch.rand(3, 6), torch.zeros(3, dtype=torch.long)
    with pytest.raises(AdvtrainError, match="starting_points"):
        HopSkipJump().min_norm(linear_model(), x, y, starting_points=torch.rand(2, 6))


def test_unbounded_success_and_norm_shrinks_with_steps(digits_model, points):
    x, y = points
    medians = {}
    for steps in (2, 10):
        result = HopSkipJump(steps=steps, seed=0).min_norm(digits_model, x, y)
        assert float(result.success.float().mean()) == 1.0
        with torch.no_grad():
            assert bool((digits_model(result.x_adv).argmax(1) != y).all())
        assert torch.allclose(result.norm, lp_norm(result.x_adv - x, "l2"), atol=1e-5)
        medians[steps] = float(result.norm.median())
    assert medians[10] < 0.9 * medians[2], medians
    assert medians[10] < 1.0, medians  # the undefended digits CNN is not robust


def test_linf_minimum_norm(digits_model, points):
    x, y = points
    result = HopSkipJump(norm="linf", steps=6, seed=0).min_norm(digits_model, x, y)
    assert bool(result.success.all())
    assert float(result.norm.median()) < 0.3
    assert torch.allclose(result.norm, lp_norm(result.x_adv - x, "linf"), atol=1e-6)


def test_bounded_run_stops_a_point_once_it_is_inside_eps(digits_model, points):
    x, y = points
    eps = 0.3
    unbounded = HopSkipJump(norm="linf", steps=10, seed=0)
    found = unbounded.min_norm(digits_model, x, y)
    bounded = HopSkipJump(norm="linf", eps=eps, steps=10, seed=0)
    x_adv = bounded(digits_model, x, y)
    assert bool(ThreatModel("linf", eps).contains(x_adv, x).all())
    with torch.no_grad():
        broken = digits_model(x_adv).argmax(1) != y
    within = found.norm <= eps
    assert bool(within.any()) and bool(broken[within].all())
    # A point inside eps stops querying: the bounded run spends less on it than all 10 steps.
    assert bool((bounded.queries_used[within] < unbounded.queries_used[within]).all())


def test_only_labels_without_gradients_and_honest_query_count(digits_model, points):
    x, y = points
    spy = Spy(digits_model)
    Logits.log = []
    attack = HopSkipJump(steps=3, seed=0)
    result = attack.min_norm(spy, x, y)
    assert bool(result.success.all())
    assert spy.grad_enabled == {False}
    assert set(Logits.log) == {"argmax"}, set(Logits.log)
    # Every input the model saw is a counted query, but the base's one check of the result.
    assert attack.queries_used.shape == (len(x),) and attack.queries_used.dtype == torch.int64
    assert spy.rows == int(attack.queries_used.sum()) + len(x)


def test_query_budget_is_respected(digits_model, points):
    x, y = points
    for norm, budget in (("l2", 350), ("linf", 700)):
        attack = HopSkipJump(norm=norm, steps=40, n_queries=budget, seed=0)
        result = attack.min_norm(digits_model, x, y)
        used = attack.queries_used
        assert int(used.max()) <= budget
        assert int(used.min()) >= budget - 10  # the budget, not the steps, stopped the attack
        assert bool(result.success.all())
    spy = Spy(digits_model)
    HopSkipJump(n_queries=1, seed=0).min_norm(spy, x, y)
    assert spy.rows == 2 * len(x)  # the clean check, then the base's check


def test_already_misclassified_points_cost_one_query(digits_model, digits):
    x, y = digits.test.x[:40], digits.test.y[:40]
    with torch.no_grad():
        wrong = digits_model(x).argmax(1) != y
    assert bool(wrong.any())
    attack = HopSkipJump(steps=2, seed=0)
    result = attack.min_norm(digits_model, x[wrong], y[wrong])
    assert bool((result.norm == 0).all()) and bool(result.success.all())
    assert bool((attack.queries_used == 1).all())


def test_seed_determinism(digits_model, points):
    x, y = points[0][:8], points[1][:8]
    runs = [HopSkipJump(steps=3, seed=7) for _ in range(2)]
    a, b = (run.min_norm(digits_model, x, y) for run in runs)
    assert torch.equal(a.x_adv, b.x_adv)
    assert torch.equal(runs[0].queries_used, runs[1].queries_used)
    c = HopSkipJump(steps=3, seed=8).min_norm(digits_model, x, y)
    assert not torch.equal(a.x_adv, c.x_adv)


@pytest.mark.parametrize("norm, eps", [("l2", 0.8), ("linf", 0.15)])
def test_outputs_inside_threat_model_on_images(digits_model, points, norm, eps):
    x, y = points
    attack = HopSkipJump(norm=norm, eps=eps, steps=4, seed=0, batch_size=8, restarts=2)
    x_adv = attack(digits_model, x, y)
    assert bool(attack.threat.contains(x_adv, x).all())
    with torch.no_grad():
        fooled = float((digits_model(x_adv).argmax(1) != y).float().mean())
    assert fooled > 0.3, fooled
    assert attack.queries_used.shape == (len(x),)
    assert int(attack.queries_used.max()) <= 2 * attack.n_queries


@pytest.mark.parametrize("norm, eps", [("l2", 0.5), ("linf", 0.2)])
def test_tabular_mask_and_per_feature_bounds(norm, eps):
    model = linear_model()
    generator = torch.Generator().manual_seed(0)
    x = LOWER + (UPPER - LOWER) * torch.rand(30, 6, generator=generator)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    threat = ThreatModel(norm=norm, eps=eps, lower=LOWER, upper=UPPER, mask=MASK)
    attack = HopSkipJump(threat, steps=5, seed=0)
    result = attack.min_norm(model, x, y)
    bounded = attack(model, x, y)
    assert bool(threat.contains(bounded, x).all())
    for x_adv in (result.x_adv, bounded):  # min_norm may leave the ball, never the box or mask
        assert bool(((x_adv >= LOWER - 1e-6) & (x_adv <= UPPER + 1e-6)).all())
        assert torch.equal(x_adv[:, ~MASK], x[:, ~MASK])
    assert bool(result.success.all())
    with torch.no_grad():
        assert bool((model(result.x_adv).argmax(1) != y).all())
    # The distance to the nearest linear boundary through the mutable features (box ignored)
    # bounds the true minimum from below: nothing may beat it, and HSJ should come close.
    with torch.no_grad():
        rows = (model.weight[y][:, None] - model.weight[None]) * MASK  # (n, classes, d)
        dual = 2 if norm == "l2" else 1
        gaps = (logits.gather(1, y[:, None]) - logits) / rows.norm(p=dual, dim=2)
        bound = gaps.masked_fill(rows.abs().sum(2) == 0, float("inf")).amin(1)
    ratio = result.norm / bound
    assert bool((ratio > 1 - 1e-4).all()), ratio
    assert float(ratio.median()) < 1.6, ratio


def test_targeted_from_starting_points(digits, digits_model, points):
    x, y = points[0][:12], points[1][:12]
    target = (y + 1) % 10
    with torch.no_grad():
        pool_x = digits.test.x[100:400]
        pool_pred = digits_model(pool_x).argmax(1)
    starts = torch.stack([pool_x[(pool_pred == t).nonzero()[0, 0]] for t in target.tolist()])
    attack = HopSkipJump(steps=6, seed=0)
    result = attack.min_norm(digits_model, x, y, target=target, starting_points=starts)
    with torch.no_grad():
        assert torch.equal(digits_model(result.x_adv).argmax(1), target)
    assert bool(result.success.all())
    assert bool((result.norm < lp_norm(starts - x, "l2")).all())
    x_adv = HopSkipJump(steps=6, seed=0, eps=2.0)(
        digits_model, x, y, target=target, starting_points=starts
    )
    with torch.no_grad():
        hit = float((digits_model(x_adv).argmax(1) == target).float().mean())
    assert hit > 0.8, hit


def test_targeted_from_noise_where_noise_hits_the_target(digits_model, points):
    x, y = points
    with torch.no_grad():
        noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        noise_labels = digits_model(noise).argmax(1)
    common = int(noise_labels.mode().values)
    keep = y != common
    x, y = x[keep], y[keep]
    target = torch.full_like(y, common)
    result = HopSkipJump(steps=4, seed=0).min_norm(digits_model, x, y, target=target)
    assert float(result.success.float().mean()) >= 0.9
    with torch.no_grad():
        pred = digits_model(result.x_adv[result.success]).argmax(1)
    assert bool((pred == common).all())


def test_label_oracle_counts_and_budget():
    model = linear_model()
    y = torch.tensor([0, 1])
    oracle = LabelOracle(model, y, None, n_queries=5, query_batch_size=2)
    points = torch.rand(5, 6)
    rows = torch.tensor([0, 0, 1, 0, 1])
    with torch.no_grad():
        expected = model(points).argmax(1) != y[rows]
    assert torch.equal(oracle(points, rows), expected)
    assert oracle.queries.tolist() == [3, 2]
    assert oracle.left(torch.tensor([0, 1])).tolist() == [2, 3]


def test_restarts_map_starting_points_and_queries_to_their_rows():
    """``__call__``'s second run attacks only the rows the first left standing: each of them
    must get its own starting point, and its queries must be added to its own row."""
    model = Spy(linear_model())
    generator = torch.Generator().manual_seed(1)
    pool = LOWER + (UPPER - LOWER) * torch.rand(500, 6, generator=generator)
    with torch.no_grad():
        labels = model.model(pool).argmax(1)
    x = pool[:10]
    y, target = labels[:10], (labels[:10] + 1) % 3
    valid = torch.arange(10) % 2 == 0  # even rows start at their target, odd rows at their class
    hits = torch.stack(
        [pool[(labels == t).nonzero()[-1 - i, 0]] for i, t in enumerate(target.tolist())]
    )
    misses = torch.stack(
        [pool[(labels == c).nonzero()[-20 - i, 0]] for i, c in enumerate(y.tolist())]
    )
    starts = torch.where(valid[:, None], hits, misses)
    attack = HopSkipJump(n_queries=2, restarts=2, batch_size=4, seed=0, lower=LOWER, upper=UPPER)
    seen: list[torch.Tensor] = []
    model.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    x_adv = attack(model, x, y, target=target, starting_points=starts)
    assert torch.allclose(x_adv[valid], hits[valid], atol=1e-6)
    assert attack.queries_used.tolist() == [2 if v else 4 for v in valid.tolist()]
    queried = torch.cat(seen)
    # Each start was queried twice: a hit in run 1 and by the base's check of the result, a miss
    # once in each run of its row; a start given to the wrong row would be counted elsewhere.
    for row in range(10):
        assert int(((queried - starts[row]).abs().amax(1) < 1e-6).sum()) == 2, row
