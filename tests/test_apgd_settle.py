"""APGD's ``settle_below``: stalled points far from the boundary leave the run at a checkpoint
(the longer run of the "loss still improving" diagnostic)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advtrain.attacks import APGD
from advtrain.errors import AdvtrainError
from advtrain.evaluation import predict
from advtrain.losses import cross_entropy


class Counted(nn.Module):
    """Four inputs, five classes, true class 0; counts the images it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 5)
        with torch.no_grad():
            self.layer.weight.copy_(
                torch.tensor([[0.0] * 4, [0.1] * 4, [10.0] * 4, [0.0] * 4, [0.0] * 4])
            )
            self.layer.bias.copy_(torch.tensor([0.0, -1.0, -21.0, -50.0, -60.0]))
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return self.layer(x)


def test_settled_points_leave_and_the_breaks_stay() -> None:
    # x = 0.5: class 2 is within reach (breaks); x = 0: it is not, and its cross-entropy stays
    # near 0.32 < ln(2) / 2, where the run stalls
    x, y = torch.tensor([[0.5] * 4, [0.0] * 4]), torch.zeros(2, dtype=torch.long)
    model = Counted().eval()
    full = APGD(eps=0.1, steps=100, seed=0)(model, x, y)
    every = model.images
    model.images = 0
    settled = APGD(eps=0.1, steps=100, seed=0, settle_below=math.log(2) / 2)(model, x, y)
    assert model.images < every / 2
    assert predict(model, settled).tolist() == predict(model, full).tolist() == [2, 0]
    losses = [cross_entropy(model(a[1:]), y[1:]).item() for a in (full, settled)]
    assert losses[1] == pytest.approx(losses[0], abs=1e-3)


def test_settle_below_is_checked() -> None:
    with pytest.raises(AdvtrainError, match="settle_below"):
        APGD(eps=0.1, settle_below="low")  # type: ignore[arg-type]
    assert APGD(eps=0.1)._hyperparameters()["settle_below"] is None
