"""Bound propagation (advtrain.certify): IBP and CROWN are sound, CROWN is never looser than IBP,
eps = 0 gives the exact outputs, and what is not supported is refused up front."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advtrain.attacks import PGD
from advtrain.certify import (
    interval_bounds,
    margin_lower_bounds,
    training_margins,
    verify,
)
from advtrain.certify.network import parse
from advtrain.certify.operations import AddOp
from advtrain.errors import AdvtrainError
from advtrain.models import build_model
from advtrain.models.adapters import Normalize
from advtrain.threat import ThreatModel

METHODS = ("ibp", "crown-ibp", "crown")
ATOL = 1e-4


def conv_net(seed: int) -> nn.Sequential:
    """Conv, BatchNorm (eval, random statistics), AvgPool, nested Sequential, Linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Identity()),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 12),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(12, 5),
    )
    batchnorm = model[1]
    batchnorm.running_mean.uniform_(-0.2, 0.2)
    batchnorm.running_var.uniform_(0.5, 2.0)
    batchnorm.weight.data.uniform_(0.5, 1.5)
    batchnorm.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 20),
        nn.BatchNorm1d(20),
        nn.ReLU(),
        nn.Linear(20, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    ).eval()


def stacked_convs(seed: int) -> nn.Sequential:
    """Normalisation, then two convolutions before the first ReLU (its inputs' IBP box is not
    exact, so full CROWN tightens it)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        Normalize([0.5], [0.3]),
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 5),
    ).eval()


def points(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in [0, 0.8] (inside every box of :func:`threats`), some on the lower edge."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=generator) * 0.8
    x[x < 0.25] = 0.0  # some pixels on the box's edge, as in images
    return x, torch.randint(0, 5, (n,), generator=generator)


def threats() -> dict[str, ThreatModel]:
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    mask[:, :2] = False  # two rows fixed
    upper = torch.full((1, 8, 8), 1.0)
    upper[..., 4:] = 0.8  # per-feature box
    return {
        "linf": ThreatModel("linf", 0.05),
        "linf-mask-box": ThreatModel("linf", 0.1, lower=0.0, upper=upper, mask=mask),
        "l2": ThreatModel("l2", 0.5),
        "l2-mask": ThreatModel("l2", 0.8, mask=mask),
    }


def margins_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return logits.gather(1, y[:, None]) - logits


@pytest.mark.parametrize("net", [conv_net, mlp, stacked_convs])
@pytest.mark.parametrize("name", list(threats()))
def test_bounds_hold_at_sampled_and_attacked_points(net, name):
    threat, model = threats()[name], net(1)
    x, y = points()
    lower, upper = interval_bounds(model, x, threat)
    bounds = {method: margin_lower_bounds(model, x, y, threat, method) for method in METHODS}
    generator = torch.Generator().manual_seed(2)
    candidates = [threat.random_start(x, generator) for _ in range(64)]
    candidates.append(PGD(threat, steps=20, seed=0, early_stop=False)(model, x, y))
    with torch.no_grad():
        for point in candidates:
            assert bool(threat.contains(point, x).all())
            logits, margins = model(point), margins_at(model, point, y)
            assert bool((logits >= lower - ATOL).all() and (logits <= upper + ATOL).all())
            for method, bound in bounds.items():
                assert bool((margins >= bound - ATOL).all()), method


@pytest.mark.parametrize("name", list(threats()))
def test_crown_is_never_looser_than_ibp_and_tighter_somewhere(name):
    threat, model = threats()[name], conv_net(3)
    x, y = points(seed=4)
    with torch.no_grad():
        ibp = margin_lower_bounds(model, x, y, threat, "ibp")
    for method in ("crown-ibp", "crown"):
        with torch.no_grad():
            bound = margin_lower_bounds(model, x, y, threat, method)
        assert bool((bound >= ibp - 1e-6).all())
        assert float((bound - ibp).sum()) > 0  # on an untrained net CROWN is tighter
    raw_ibp, raw_crown = training_margins(model, x, y, threat, crown=True)
    assert torch.allclose(raw_ibp, ibp)
    assert raw_crown is not None


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_eps_gives_the_exact_outputs(norm):
    model, (x, y) = conv_net(5), points()
    threat = ThreatModel(norm, 0.0)
    with torch.no_grad():
        lower, upper = interval_bounds(model, x, threat)
        logits = model(x)
        assert torch.allclose(lower, logits, atol=ATOL) and torch.allclose(upper, logits, atol=ATOL)
        for method in METHODS:
            bound = margin_lower_bounds(model, x, y, threat, method)
            assert torch.allclose(bound, margins_at(model, x, y), atol=ATOL)


def test_verify_batches_alike_and_verified_points_are_classified_right():
    model, (x, y) = mlp(6), points(30, seed=7)
    y = model(x).argmax(1)  # correct everywhere: some margins are positive at a small eps
    threat = ThreatModel("linf", 0.002)
    whole = verify(model, x, y, threat, "crown", batch_size=30)
    split = verify(model, x, y, threat, "crown", batch_size=7)
    assert torch.allclose(whole.margins, split.margins, atol=1e-6)
    assert torch.equal(whole.verified, split.verified)
    assert whole.verified.any() and whole.method == "crown"
    assert bool((whole.margins.gather(1, y[:, None]) == 0).all())
    wrong = (y + 1) % 5
    assert not verify(model, x, wrong, threat, "ibp").verified.any()


def test_parse_reproduces_the_model_and_keeps_gradients():
    model, (x, y) = conv_net(8), points()
    assert torch.allclose(parse(model).forward(x), model(x), atol=1e-5)
    ibp, crown = training_margins(model, x, y, ThreatModel("linf", 0.05), crown=True)
    assert crown is not None
    (ibp.sum() + crown.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Sequential(nn.Linear(4, 3), nn.Tanh()), r"'1' \(Tanh\)"),
        (nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(4, 3), nn.MaxPool1d(1))), r"'1.1'"),
        (nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), r"'1' \(BatchNorm1d\).*training"),
    ],
)
def test_unsupported_layers_are_named(model, message):
    with pytest.raises(AdvtrainError, match=message):
        interval_bounds(model, torch.rand(2, 4), ThreatModel("linf", 0.1))


def test_unsupported_threat_models_and_methods():
    model, (x, y) = mlp(9), points(4)
    with pytest.raises(AdvtrainError, match="l1"):
        margin_lower_bounds(model, x, y, ThreatModel("l1", 1.0))
    with pytest.raises(AdvtrainError, match="unknown bound method"):
        margin_lower_bounds(model, x, y, ThreatModel("linf", 0.1), "lp")
    with pytest.raises(AdvtrainError, match="labels"):
        margin_lower_bounds(model, x, y + 5, ThreatModel("linf", 0.1))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_bounds_are_exact_for_a_linear_model(norm):
    """Away from the box's edges, a linear model's margin minimum over the ball is known:
    ``m(x) - eps * ||w_y - w_c||_*`` over the free features (dual norm: l1 for linf, l2 for l2)."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).eval()
    x = 0.3 + 0.4 * torch.rand(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    mask = torch.rand(1, 8, 8) > 0.5
    threat = ThreatModel(norm, 0.02 if norm == "linf" else 0.1, mask=mask)
    weight = model[1].weight.detach()
    rows = (weight[y][:, None, :] - weight[None, :, :]) * mask.flatten()
    dual = rows.abs().sum(2) if norm == "linf" else rows.norm(dim=2)
    with torch.no_grad():
        exact = margins_at(model, x, y) - threat.eps * dual
        for method in METHODS:
            bound = margin_lower_bounds(model, x, y, threat, method)
            assert torch.allclose(bound, exact, atol=1e-5)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv with an identity shortcut: ``x + f(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.bn(self.conv1(x))))


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(1, 4, 3, stride=2, padding=1), ResidualBlock()
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(torch.relu(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(F.relu(out), 1), 1))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_residual_networks_are_traced_and_bounded_soundly(norm):
    torch.manual_seed(11)
    model = ResidualNet().eval()
    x, y = points()
    assert torch.allclose(parse(model).forward(x), model(x), atol=1e-6)
    threat = ThreatModel(norm, 0.05 if norm == "linf" else 0.3)
    with torch.no_grad():
        bounds = {method: margin_lower_bounds(model, x, y, threat, method) for method in METHODS}
    assert bool((bounds["crown"] >= bounds["ibp"]).all())
    generator = torch.Generator().manual_seed(12)
    candidates = [threat.random_start(x, generator) for _ in range(32)]
    candidates.append(PGD(threat, steps=20, seed=0, early_stop=False)(model, x, y))
    with torch.no_grad():
        for point in candidates:
            margins = margins_at(model, point, y)
            for method, bound in bounds.items():
                assert bool((margins >= bound - ATOL).all()), method


def test_preact_resnet18_is_read_whole():
    model = build_model("preact-resnet18", in_shape=(3, 8, 8), n_classes=10).eval()
    x = torch.rand(2, 3, 8, 8)
    network = parse(model)
    assert sum(isinstance(op, AddOp) for op in network) == 8  # one per residual block
    with torch.no_grad():
        assert torch.allclose(network.forward(x), model(x), atol=1e-5)
        lower, upper = interval_bounds(model, x, ThreatModel("linf", 0.0))
    assert torch.allclose(lower, upper, atol=1e-3)


class Tanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


class ValueBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Sequential(nn.Linear(4, 3), Tanh()), r"'tanh' \(tanh inside module '1' \(Tanh\)\)"),
        (ValueBranch(), r"ValueBranch cannot be read"),
    ],
)
def test_untraceable_forwards_are_named(model, message):
    with pytest.raises(AdvtrainError, match=message):
        interval_bounds(model, torch.rand(2, 4), ThreatModel("linf", 0.1))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_bounds_stay_below_the_minimum_over_a_dense_grid(norm):
    """Two inputs: the grid's minimum margin is at least the true minimum, which every bound must
    not exceed (a check tight enough to catch a wrong relaxation line)."""
    torch.manual_seed(13)
    model = nn.Sequential(
        nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    ).eval()
    x, y = (
        torch.tensor([[0.3, 0.6], [0.5, 0.5], [0.8, 0.2], [0.1, 0.9]]),
        torch.tensor([0, 1, 2, 0]),
    )
    threat = ThreatModel(norm, 0.2)
    steps = torch.linspace(-0.2, 0.2, 161)
    grid = torch.cartesian_prod(steps, steps)
    if norm == "l2":
        grid = grid[grid.norm(dim=1) <= 0.2]
    with torch.no_grad():
        for method in METHODS:
            bound = margin_lower_bounds(model, x, y, threat, method)
            for i in range(len(x)):
                around = (x[i] + grid).clamp(0, 1)
                least = margins_at(model, around, y[i].expand(len(around))).min(0).values
                assert bool((bound[i] <= least + 1e-5).all()), (method, i)
