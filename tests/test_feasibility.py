"""Table constraints: the threat model's projection always ends on a feasible row.

Property tests draw random tables (continuous, integer, binary and categorical columns, random
directions and immutable columns), random linear rules that the clean rows satisfy, and arbitrary
attack points; whatever the attack proposes, ``ThreatModel.project`` must return a row inside the
ball, the box and the mask that satisfies every constraint, and ``contains`` must agree.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advtrain.errors import ThreatModelError
from advtrain.feasibility import FeatureConstraints
from advtrain.threat import ThreatModel

KINDS = ("continuous", "integer", "binary", "categorical")


def random_table(seed: int, n_columns: int, n_rows: int, n_rules: int):
    """A random encoded table, its constraints and mask; every clean row satisfies every rule."""
    g = torch.Generator().manual_seed(seed)
    offsets, scales, integer, direction, mutable, groups = [], [], [], [], [], []
    columns: list[torch.Tensor] = []
    numeric: list[int] = []
    for _ in range(n_columns):
        kind = KINDS[int(torch.randint(0, 4, (1,), generator=g))]
        start = len(offsets)
        move = bool(torch.rand(1, generator=g) < 0.8)
        way = int(torch.randint(-1, 2, (1,), generator=g)) if kind != "categorical" else 0
        if kind == "categorical":
            k = int(torch.randint(2, 5, (1,), generator=g))
            chosen = torch.randint(0, k, (n_rows,), generator=g)
            columns.append(torch.nn.functional.one_hot(chosen, k).double())
            offsets += [0.0] * k
            scales += [1.0] * k
            integer += [True] * k
            direction += [0] * k
            mutable += [move] * k
            groups.append((start, start + k))
            continue
        if kind == "binary":
            low, span = 0.0, 1.0
            raw = torch.randint(0, 2, (n_rows,), generator=g).double()
        elif kind == "integer":
            low = float(torch.randint(-5, 5, (1,), generator=g))
            span = float(torch.randint(1, 40, (1,), generator=g))
            raw = low + torch.randint(0, int(span) + 1, (n_rows,), generator=g).double()
        else:
            low = float(torch.randn(1, generator=g) * 100)
            span = float(torch.rand(1, generator=g) * 1000 + 0.1)
            raw = low + span * torch.rand(n_rows, generator=g, dtype=torch.float64)
        columns.append(((raw - low) / span).unsqueeze(1))
        offsets.append(low)
        scales.append(span)
        integer.append(kind != "continuous")
        direction.append(way)
        mutable.append(move)
        numeric.append(start)
    z = torch.cat(columns, dim=1)
    d = z.shape[1]
    coefficients = torch.zeros(n_rules, d, dtype=torch.float64)
    for r in range(n_rules):
        for j in numeric:
            if bool(torch.rand(1, generator=g) < 0.5):
                coefficients[r, j] = float(torch.randn(1, generator=g))
    raw = torch.tensor(offsets, dtype=torch.float64) + torch.tensor(scales) * z
    slack = torch.rand(n_rules, generator=g, dtype=torch.float64) * torch.tensor(scales).mean()
    slack[: n_rules // 2] = 0  # some rules tight at one clean row
    bounds = (raw @ coefficients.T).amax(dim=0) + slack
    constraints = FeatureConstraints(
        offset=torch.tensor(offsets),
        scale=torch.tensor(scales),
        integer=torch.tensor(integer),
        direction=torch.tensor(direction),
        groups=tuple(groups),
        rule_coefficients=coefficients,
        rule_bounds=bounds,
        rules=tuple(f"rule {r}" for r in range(n_rules)),
    )
    return z.float(), constraints, torch.tensor(mutable)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_columns=st.integers(1, 7),
    n_rules=st.integers(0, 4),
    norm=st.sampled_from(["linf", "l2", "l1"]),
    eps=st.sampled_from([0.01, 0.05, 0.3, 1.0, 2.0]),
    spread=st.floats(0.0, 3.0),
)
def test_projection_is_always_feasible(seed, n_columns, n_rules, norm, eps, spread):
    x, constraints, mutable = random_table(seed, n_columns, 16, n_rules)
    threat = ThreatModel(
        norm=norm,
        eps=eps,
        lower=torch.zeros(x.shape[1]),
        upper=torch.ones(x.shape[1]),
        mask=mutable,
        constraints=constraints,
    )
    assert bool(threat.contains(x, x).all()), "the clean rows must be feasible"
    g = torch.Generator().manual_seed(seed + 1)
    proposal = x + spread * torch.randn(x.shape, generator=g)
    projected = threat.project(proposal, x)
    assert bool(threat.contains(projected, x).all())
    broken = constraints.violations(projected, x)
    assert not any(bool(v.any()) for v in broken.values())
    start = threat.random_start(x, torch.Generator().manual_seed(seed))
    assert bool(threat.contains(start, x).all())


def one_table() -> tuple[torch.Tensor, FeatureConstraints]:
    """amount (continuous 0..1000), tx_1h and tx_24h (integers 0..50), is_foreign (binary,
    increase only), channel (3 categories); rules: tx_1h <= tx_24h, amount <= 40 * tx_24h."""
    constraints = FeatureConstraints(
        offset=torch.zeros(7),
        scale=torch.tensor([1000.0, 50.0, 50.0, 1.0, 1.0, 1.0, 1.0]),
        integer=torch.tensor([False, True, True, True, True, True, True]),
        direction=torch.tensor([0, 0, 0, 1, 0, 0, 0]),
        groups=((4, 7),),
        rule_coefficients=torch.tensor(
            [[0.0, 1.0, -1.0, 0, 0, 0, 0], [1.0, 0.0, -40.0, 0, 0, 0, 0]], dtype=torch.float64
        ),
        rule_bounds=torch.zeros(2, dtype=torch.float64),
        rules=("tx_1h <= tx_24h", "amount <= 40 * tx_24h"),
        names=("amount", "tx_1h", "tx_24h", "is_foreign", "channel=app", "channel=pos", "c=web"),
    )
    raw = torch.tensor([[100.0, 2, 5, 0, 1, 0, 0], [400.0, 10, 10, 1, 0, 0, 1]])
    return (raw / constraints.scale).float(), constraints


def test_each_kind_of_violation_is_named():
    x, constraints = one_table()
    assert bool(constraints.feasible(x, x).all())
    cases = {
        "integer": (1, 0.5 / 50),  # half a transaction
        "one_hot": (5, 0.5),  # two categories at once
        "direction": (3, -1.0),  # is_foreign may only go up: row 1 is already 1
        "rules": (1, 9 / 50),  # tx_1h 11 > tx_24h 5
    }
    for kind, (column, change) in cases.items():
        bad = x.clone()
        bad[0 if kind != "direction" else 1, column] += change
        broken = constraints.violations(bad, x)
        assert bool(broken[kind].any()), kind
        assert not bool(constraints.feasible(bad, x).all()), kind


def test_repair_keeps_what_is_allowed_and_stays_in_the_ball():
    x, constraints = one_table()
    threat = ThreatModel(
        eps=0.2, lower=torch.zeros(7), upper=torch.ones(7), constraints=constraints
    )
    wanted = x.clone()
    wanted[:, 0] += 0.1  # amount + 100
    wanted[:, 1] += 0.08  # tx_1h + 4
    projected = threat.project(wanted, x)
    assert bool(threat.contains(projected, x).all())
    raw = constraints.to_raw(projected)
    # row 0: tx_1h 2 -> 6 would pass tx_24h = 5, so tx_1h alone is held at 5 (the rule tight);
    # amount, which that rule does not name, keeps its whole change (200 <= 40 * 5 holds)
    assert raw[0, 0] == pytest.approx(200.0, abs=1e-2)
    assert raw[0, 1] == pytest.approx(5.0, abs=1e-3)
    # row 1 was tight on both rules (tx_1h = tx_24h, amount = 40 * tx_24h): it cannot move
    assert torch.allclose(projected[1], x[1])
    assert bool((projected[:, 2:] == x[:, 2:]).all())


def test_bad_constraints_are_refused_in_one_line():
    with pytest.raises(ThreatModelError, match="scale"):
        FeatureConstraints(
            offset=torch.zeros(2),
            scale=torch.tensor([1.0, 0.0]),
            integer=torch.zeros(2),
            direction=torch.zeros(2),
        )
    _, constraints = one_table()
    threat = ThreatModel(eps=0.1, lower=0.0, upper=1.0, constraints=constraints)
    with pytest.raises(ThreatModelError, match="7 encoded features"):
        threat.validate(torch.zeros(3, 6))
