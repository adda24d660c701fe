"""Target ranking of the targeted attacks: logit order (AutoAttack) and MALT's linearised distance
(Melamed et al., NeurIPS 2024)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advtrain.attacks import APGDT, FABT
from advtrain.attacks.targeting import linearised_distance, ranked_targets
from advtrain.errors import AdvtrainError
from advtrain.evaluation import predict

D = 4


def affine_model() -> nn.Module:
    """Five classes on [0, 1]^4, true class 0 at x = 0.5: class 1 has the smaller logit gap
    (0.8) but a flat boundary (||w_0 - w_1||_1 = 0.4, distance 2), class 2 the larger gap (1)
    and a steep one (||w_0 - w_2||_1 = 40, distance 0.025); classes 3 and 4 are far."""
    layer = nn.Linear(D, 5)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0] * D, [0.1] * D, [10.0] * D, [0.0] * D, [0.0] * D]))
        layer.bias.copy_(torch.tensor([0.0, -1.0, -21.0, -50.0, -60.0]))
    return layer.eval()


class Flat(nn.Module):
    """Fixed logits whatever the input: every gradient is zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.tensor([3.0, 2.0, 0.0, 1.0])
        return logits.expand(len(x), -1) + 0 * x.flatten(1).sum(dim=1, keepdim=True)


def test_malt_ranks_by_linearised_distance_not_logit() -> None:
    model, x, y = affine_model(), torch.full((2, D), 0.5), torch.zeros(2, dtype=torch.long)
    distance = linearised_distance(model, x, y, torch.tensor([[1, 2]] * 2), "linf")
    assert distance[0].tolist() == pytest.approx([0.8 / 0.4, 1.0 / 40.0])
    assert ranked_targets(model, x, y, 2, "logits", "linf")[0].tolist() == [1, 2]
    assert ranked_targets(model, x, y, 2, "malt", "linf")[0].tolist() == [2, 1]
    assert ranked_targets(model, x, y, None, "malt", "linf")[0].tolist() == [2, 1, 3, 4]
    assert ranked_targets(model, x, y, 1, "malt", "linf").shape == (2, 1)


def test_malt_falls_back_to_logit_order_without_gradients() -> None:
    x, y = torch.rand(3, D), torch.zeros(3, dtype=torch.long)
    assert ranked_targets(Flat(), x, y, 3, "malt", "linf").tolist() == [[1, 3, 2]] * 3


def test_apgdt_with_one_malt_target_finds_the_near_boundary() -> None:
    model, x, y = affine_model(), torch.full((1, D), 0.5), torch.zeros(1, dtype=torch.long)
    by_logit = APGDT(eps=0.1, steps=20, n_targets=1, seed=0)(model, x, y)
    by_malt = APGDT(eps=0.1, steps=20, n_targets=1, target_order="malt", seed=0)(model, x, y)
    assert predict(model, by_logit).tolist() == [0]  # class 1 is out of reach at eps 0.1
    assert predict(model, by_malt).tolist() == [2]
    assert (by_malt - x).abs().max() <= 0.1 + 1e-6


def test_fabt_with_malt_order_finds_the_smaller_margin() -> None:
    model, x, y = affine_model(), torch.full((1, D), 0.5), torch.zeros(1, dtype=torch.long)
    by_logit = FABT(norm="linf", steps=10, n_targets=1).min_norm(model, x, y)
    by_malt = FABT(norm="linf", steps=10, n_targets=1, target_order="malt").min_norm(model, x, y)
    assert float(by_malt.norm[0]) < 0.1 < float(by_logit.norm[0])


def test_target_order_is_checked_and_reported() -> None:
    with pytest.raises(AdvtrainError, match="target_order"):
        APGDT(eps=0.1, target_order="nearest")
    with pytest.raises(AdvtrainError, match="target_order"):
        FABT(target_order="")
    assert APGDT(eps=0.1, target_order="malt")._hyperparameters()["target_order"] == "malt"
