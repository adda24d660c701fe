"""Losses: the DLR formulas of Croce & Hein (2020), checked on hand-made logits."""

from __future__ import annotations

import pytest
import torch

from advtrain.losses import attack_objective, cw_margin, dlr, dlr_targeted


def test_dlr_matches_its_formula():
    logits = torch.tensor([[3.0, 1.0, 0.5, -2.0], [0.0, 4.0, 1.0, 2.0]])
    y = torch.tensor([0, 0])
    # sample 0 is correct: -(z_y - max other) / (z_1 - z_3) = -(3 - 1) / (3 - 0.5)
    # sample 1 is wrong:   -(0 - 4) / (4 - 1)
    assert dlr(logits, y).tolist() == pytest.approx([-2 / 2.5, 4 / 3])


def test_dlr_is_invariant_to_shift_and_scale():
    logits, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.allclose(dlr(logits, y), dlr(7 * logits + 3, y), atol=1e-5)


def test_targeted_dlr_matches_its_formula():
    logits = torch.tensor([[3.0, 1.0, 0.5, -2.0]])
    value = dlr_targeted(logits, torch.tensor([0]), torch.tensor([1]))
    assert value.item() == pytest.approx(-(3 - 1) / (3 - (0.5 - 2.0) / 2))
    assert (
        attack_objective(logits, torch.tensor([0]), torch.tensor([1]), "dlr").item() == value.item()
    )


def test_cw_margin_sign_tells_misclassification():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    assert cw_margin(logits, torch.tensor([0, 0])).tolist() == [-1.0, 3.0]
