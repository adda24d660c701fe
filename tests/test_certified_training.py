"""Certified training (ibp, crown-ibp): options, the kappa and beta ramps, and a short run that
raises verified accuracy over a standard-trained network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advtrain.certify import training_margins, verify
from advtrain.errors import AdvtrainError
from advtrain.models import build_model
from advtrain.threat import ThreatModel
from advtrain.training import TrainConfig, Trainer, make_method

THREAT = ThreatModel("linf", 0.2)


def test_options_are_checked():
    with pytest.raises(AdvtrainError, match="kappa_end"):
        make_method("ibp", THREAT, kappa_end=1.5)
    with pytest.raises(AdvtrainError, match="beta_start"):
        make_method("crown-ibp", THREAT, beta_start=-0.1)
    with pytest.raises(AdvtrainError, match="method 'ibp'"):
        make_method("ibp", THREAT, beta_end=0.0)  # CROWN-IBP's option only
    make_method("ibp", THREAT, steps=5, step_size=0.01)  # the trainer's attack options pass


def test_batchnorm_in_training_mode_is_refused():
    torch.manual_seed(0)
    model = build_model("digits-cnn-bn", in_shape=(1, 8, 8), n_classes=10).train()
    method = make_method("ibp", THREAT)
    with pytest.raises(AdvtrainError, match=r"layer '1' is a BatchNorm2d"):
        method.loss(model, torch.rand(4, 1, 8, 8), torch.arange(4))


def test_kappa_and_beta_follow_the_eps_ramp():
    ibp, crown = make_method("ibp", THREAT), make_method("crown-ibp", THREAT)
    for method in (ibp, crown):
        method.set_eps(0.0)
        assert method.kappa == 1.0
    assert crown.beta == 1.0
    ibp.set_eps(0.1)
    crown.set_eps(0.1)
    assert ibp.kappa == pytest.approx(0.75) and crown.kappa == pytest.approx(0.5)
    assert crown.beta == pytest.approx(0.5)
    ibp.set_eps(0.2)
    crown.set_eps(0.2)
    assert ibp.kappa == pytest.approx(0.5) and crown.kappa == 0.0 and crown.beta == 0.0


def test_losses_at_the_ends_of_the_ramp():
    torch.manual_seed(0)
    model = build_model("digits-cnn", in_shape=(1, 8, 8), n_classes=10)
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    crown = make_method("crown-ibp", THREAT, kappa_end=0.5)
    crown.set_eps(0.0)  # kappa 1: clean cross-entropy alone
    loss, logits = crown.loss(model, x, y)
    assert torch.allclose(loss, F.cross_entropy(model(x), y)) and logits.shape == (6, 10)
    crown.set_eps(0.2)  # beta 0: IBP's bound alone, as the ibp method computes it
    ibp = make_method("ibp", THREAT)
    assert torch.allclose(crown.loss(model, x, y)[0], ibp.loss(model, x, y)[0])
    half = make_method("crown-ibp", THREAT)
    half.set_eps(0.1)  # kappa 0.5, beta 0.5
    bound_ibp, bound_crown = training_margins(model, x, y, half.threat, crown=True)
    assert bound_crown is not None
    robust = F.cross_entropy(-(bound_ibp + bound_crown) / 2, y)
    expected = 0.5 * F.cross_entropy(model(x), y) + 0.5 * robust
    assert torch.allclose(half.loss(model, x, y)[0], expected)


def _trained(digits, method: str) -> nn.Module:
    """A small two-hidden-layer perceptron trained on the 8x8 digits (about a second)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    config = TrainConfig(
        method=method,
        eps=EPS,
        epochs=10,
        warmup_epochs=5,
        batch_size=64,
        eval_steps=2,
        seed=0,
        device="cpu",
    )
    Trainer(model, digits, config).fit()
    return model.eval()


EPS = 0.15


@pytest.fixture(scope="module")
def standard_verified(digits) -> float:
    """CROWN-verified accuracy of the same network trained without bounds."""
    x, y = digits.test.x[:200], digits.test.y[:200]
    return verify(_trained(digits, "standard"), x, y, ThreatModel("linf", EPS), "crown").accuracy


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_a_short_run_raises_verified_accuracy(digits, standard_verified, method):
    x, y = digits.test.x[:200], digits.test.y[:200]
    before = standard_verified
    after = verify(_trained(digits, method), x, y, ThreatModel("linf", EPS), "crown").accuracy
    assert after >= before + 0.05, (before, after)
