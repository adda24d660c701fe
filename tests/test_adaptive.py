"""EOT and BPDA: the adaptive attacker breaks randomised and non-differentiable defences that
fool a naive gradient attack."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advtrain.attacks import BPDA, EOT, PGD, is_randomized, majority_vote
from advtrain.errors import AdvtrainError
from advtrain.evaluation import predict

torch.set_num_threads(1)


class NoisyInput(nn.Module):
    """A randomised defence: Gaussian noise on the input at every call, in eval mode too."""

    def __init__(self, model: nn.Module, std: float) -> None:
        super().__init__()
        self.model, self.std = model, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + self.std * torch.randn_like(x))


def quantize(x: torch.Tensor, levels: int = 4) -> torch.Tensor:
    """A non-differentiable input defence: a staircase with zero gradient almost everywhere."""
    return torch.round(x * (levels - 1)) / (levels - 1)


class Quantized(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(quantize(x))


def test_eot_averages_log_probabilities_and_keeps_deterministic_models_unchanged(
    digits_model, digits
):
    x = digits.test.x[:8]
    with torch.no_grad():
        wrapped = EOT(digits_model, samples=4)(x)
        plain = torch.log_softmax(digits_model(x), dim=1)
    assert torch.allclose(wrapped, plain, atol=1e-5)
    # one chunk per copy gives the same average
    with torch.no_grad():
        assert torch.allclose(EOT(digits_model, samples=4, chunk=1)(x), plain, atol=1e-5)


def test_is_randomized_and_majority_vote(digits_model, digits):
    x, y = digits.test.x[:60], digits.test.y[:60]
    noisy = NoisyInput(digits_model, std=0.05)
    assert is_randomized(noisy, x)
    assert not is_randomized(digits_model, x)
    torch.manual_seed(0)
    votes = majority_vote(noisy, x, samples=16)
    assert (
        votes.shape == y.shape and float((votes == predict(digits_model, x)).float().mean()) > 0.9
    )
    assert torch.equal(majority_vote(digits_model, x, samples=3), predict(digits_model, x))


def test_eot_breaks_a_randomised_defence_better_than_plain_pgd(digits_model, digits):
    x, y = digits.test.x[:120], digits.test.y[:120]
    noisy = NoisyInput(digits_model, std=0.5)  # heavy noise: single gradients are noisy samples
    torch.manual_seed(0)
    clean = float((majority_vote(noisy, x, samples=32) == y).float().mean())
    attack = PGD(eps=0.15, steps=20, seed=0)
    torch.manual_seed(0)
    naive = float((majority_vote(noisy, attack(noisy, x, y), samples=32) == y).float().mean())
    torch.manual_seed(0)
    adaptive = float(
        (majority_vote(noisy, attack(EOT(noisy, samples=16), x, y), samples=32) == y).float().mean()
    )
    assert clean > 0.5
    assert adaptive < naive, (clean, naive, adaptive)


def test_bpda_breaks_input_quantisation(digits_model, digits):
    x, y = digits.test.x[:120], digits.test.y[:120]
    defended = Quantized(digits_model)
    attack = PGD(eps=0.3, steps=20, seed=0)
    naive = float((predict(defended, attack(defended, x, y)) == y).float().mean())
    adaptive = float(
        (predict(defended, attack(BPDA(quantize, digits_model), x, y)) == y).float().mean()
    )
    assert naive > 0.5, naive  # zero gradients: the naive attack is stuck at its random start
    assert adaptive < 0.05, adaptive


def test_bpda_forward_is_exact_and_backward_uses_the_approximation(digits_model, digits):
    x = digits.test.x[:4].clone().requires_grad_(True)
    wrapped = BPDA(quantize, digits_model)
    out = wrapped(x)
    with torch.no_grad():
        assert torch.equal(out, digits_model(quantize(x)))
    out.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    double = BPDA(quantize, digits_model, approximation=lambda t: 2 * t)
    x2 = x.detach().clone().requires_grad_(True)
    double(x2).sum().backward()
    assert float(x2.grad.abs().sum()) > 0


def test_bad_arguments(digits_model):
    with pytest.raises(AdvtrainError, match="samples must be a positive integer"):
        EOT(digits_model, samples=0)
    with pytest.raises(AdvtrainError, match="model must be callable"):
        EOT(3)
    with pytest.raises(AdvtrainError, match="preprocess must be callable"):
        BPDA("round", digits_model)
    with pytest.raises(AdvtrainError, match="approximation gives shape"):
        BPDA(quantize, digits_model, approximation=lambda t: t.flatten(1))(
            torch.rand(2, 1, 8, 8, requires_grad=True)
        )
    with pytest.raises(AdvtrainError, match="trials must be an integer >= 2"):
        is_randomized(digits_model, torch.rand(2, 1, 8, 8), trials=1)
