"""A defence that draws its randomness once per forward call (one draw shared by every row of
the batch, as a random resize-and-pad drawn per call) is sampled across calls by EOT and the
majority vote: copies of the batch inside one call would all see the same draw."""

from __future__ import annotations

import torch
from torch import nn

import advtrain
from advtrain.attacks import draws_per_call, is_randomized, majority_vote


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class NoisePerCall(nn.Module):
    """Logits plus a noise vector drawn once per call and added to every row."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out + self.scale * torch.randn(1, out.shape[1])


class NoisePerRow(NoisePerCall):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out + self.scale * torch.randn_like(out)


def _points() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    torch.manual_seed(0)
    model = Linear().eval()
    x = torch.rand(200, 6)
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y, model


def test_per_call_draws_are_told_apart_from_per_row_draws() -> None:
    x, _, model = _points()
    per_call, per_row = NoisePerCall(model, 1.0), NoisePerRow(model, 1.0)
    assert is_randomized(per_call, x) and is_randomized(per_row, x)
    assert draws_per_call(per_call, x) and not draws_per_call(per_row, x)


def test_votes_and_the_report_sample_across_calls() -> None:
    x, y, model = _points()
    noisy = NoisePerCall(model, 0.3)

    def vote(seed: int, **options: bool) -> float:
        torch.manual_seed(seed)
        return float((majority_vote(noisy, x, samples=32, **options) == y).float().mean())

    # 32 copies inside one call share one draw: that "vote" is a single draw, far below the
    # vote over 32 separate calls, for every seed
    for seed in range(4):
        assert vote(seed, separate_calls=True) > vote(seed) + 0.1, seed
    report = advtrain.evaluate(
        noisy, x, y, eps=0.01, suite="quick", votes=32, eot_samples=4, seed=0, progress=False
    )
    assert report.settings["randomized"] and report.settings["randomness_per_call"]
    # the report's clean judgement is the vote over 32 separate calls (its chunk is seeded with 0)
    assert report.clean_accuracy == vote(0, separate_calls=True)
