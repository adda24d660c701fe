"""Transfer attack: crafted on a surrogate, judged on the target, no target gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advtrain.attacks import FGSM
from advtrain.attacks.transfer import Transfer
from advtrain.errors import AdvtrainError
from advtrain.evaluation import predict
from advtrain.evaluation.transfer import transfer_rate
from advtrain.training.surrogate import fit_surrogate


class NoGradients(nn.Module):
    """A target that refuses to give gradients: a transfer attack must never ask for them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert not torch.is_grad_enabled() or not x.requires_grad, "gradient asked of the target"
        return self.model(x)


@pytest.fixture(scope="module")
def surrogate(digits):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return fit_surrogate(model, digits.train.x, digits.train.y, epochs=15, seed=1)


def test_transfer_attack_fools_the_target_without_its_gradients(digits, digits_model, surrogate):
    x, y = digits.test.x[:120], digits.test.y[:120]
    target = NoGradients(digits_model)
    clean = float((predict(digits_model, x) == y).float().mean())
    x_adv = Transfer(surrogate, eps=0.3, seed=0)(target, x, y)
    assert target.calls > 0
    assert bool(Transfer(surrogate, eps=0.3).threat.contains(x_adv, x).all())
    adversarial = float((predict(digits_model, x_adv) == y).float().mean())
    assert clean > 0.9 and adversarial < 0.5, (clean, adversarial)


def test_transfer_rate_report(digits, digits_model, surrogate):
    x, y = digits.test.x[:120], digits.test.y[:120]
    strong = transfer_rate(digits_model, Transfer(surrogate, eps=0.3, seed=0), x, y)
    weak = transfer_rate(digits_model, Transfer(surrogate, eps=0.05, seed=0), x, y)
    assert strong.n > 100 and strong.surrogate_success > 0.95
    assert 0.5 < strong.transfer_rate <= 1.0
    assert weak.target_success < strong.target_success
    assert set(strong.to_dict()) == {"n", "surrogate_success", "target_success", "transfer_rate"}


def test_crafting_attack_by_instance_and_bad_arguments(digits, digits_model, surrogate):
    x, y = digits.test.x[:20], digits.test.y[:20]
    attack = Transfer(surrogate, eps=0.3, attack=FGSM(eps=0.3))
    assert bool(attack.threat.contains(attack(digits_model, x, y), x).all())
    with pytest.raises(AdvtrainError, match="surrogate must be a torch module"):
        Transfer("model.pt", eps=0.3)  # type: ignore[arg-type]
    with pytest.raises(AdvtrainError, match="unknown attack"):
        Transfer(surrogate, eps=0.3, attack="nope")
    with pytest.raises(AdvtrainError, match="attack_options apply only"):
        Transfer(surrogate, eps=0.3, attack=FGSM(eps=0.3), attack_options={"steps": 3})
    with pytest.raises(AdvtrainError, match="has no option 'stesp'"):
        Transfer(surrogate, eps=0.3, stesp=3)  # type: ignore[call-arg]  # misspelt on purpose


def test_transfer_restarts_draw_new_starts(digits, digits_model, surrogate):
    x, y = digits.test.x[:60], digits.test.y[:60]
    one = Transfer(surrogate, eps=0.1, seed=3, attack_options={"steps": 5})
    three = Transfer(surrogate, eps=0.1, seed=3, restarts=3, attack_options={"steps": 5})
    fooled_one = (predict(digits_model, one(digits_model, x, y)) != y).sum()
    fooled_three = (predict(digits_model, three(digits_model, x, y)) != y).sum()
    assert fooled_three >= fooled_one
    again = Transfer(surrogate, eps=0.1, seed=3, restarts=3, attack_options={"steps": 5})
    assert torch.equal(three(digits_model, x, y), again(digits_model, x, y))
