"""Training methods: the TRADES and MART formulas, free AT's carried perturbation, distillation's
phases, the clean/adversarial mix, and 1-epoch digits runs that must beat standard training
under PGD-10 (linf, eps 0.2)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advtrain.attacks import PGD
from advtrain.errors import AdvtrainError
from advtrain.evaluation.basic import clean_and_robust_accuracy
from advtrain.models import build_model
from advtrain.threat import ThreatModel
from advtrain.training.methods import (
    METHODS,
    Distillation,
    Free,
    Method,
    make_method,
    mart_loss,
    mix,
    trades_loss,
)

torch.set_num_threads(1)  # tiny models: one thread is faster and fair to the other test runs

EPS = 0.2
ADVERSARIAL = ("pgd", "fgsm-rs", "free", "trades", "mart")
ALL = ("standard", *ADVERSARIAL, "distillation")


def fresh_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("digits-cnn", in_shape=(1, 8, 8), n_classes=10)


def train(name: str, data, *, epochs: int = 1, seed: int = 0, **options) -> nn.Module:
    """A tiny trainer that keeps the methods' contract: ``replays`` calls per minibatch with a
    step after each, ``ceil(epochs / replays)`` epochs, ``on_epoch_start`` before each epoch."""
    model = fresh_model(seed)
    loss_fn = make_method(name, data.info.threat_model(norm="linf", eps=EPS), **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    replays = loss_fn.replays
    runs = math.ceil(epochs / replays)
    generator = torch.Generator().manual_seed(seed)
    x, y = data.train.x, data.train.y
    for epoch in range(1, runs + 1):
        loss_fn.on_epoch_start(model, epoch, runs)
        model.train()
        for index in torch.randperm(len(x), generator=generator).split(64):
            for _ in range(replays):
                loss, logits = loss_fn(model, x[index], y[index])
                assert loss.dim() == 0 and bool(torch.isfinite(loss))
                assert logits.shape == (len(index), 10)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(digits):
    """Trained models by (method, epochs), each trained once for the module."""
    cache: dict[tuple[str, int], nn.Module] = {}

    def get(name: str, epochs: int = 1) -> nn.Module:
        if (name, epochs) not in cache:
            cache[name, epochs] = train(name, digits, epochs=epochs)
        return cache[name, epochs]

    return get


def robust_accuracy(model: nn.Module, data, loss: str = "ce") -> float:
    attack = PGD(data.info.threat_model(norm="linf", eps=EPS), steps=10, loss=loss, seed=0)
    return clean_and_robust_accuracy(model, data.val.x, data.val.y, attack).robust_accuracy


@pytest.fixture
def batch(digits):
    return digits.train.x[:32], digits.train.y[:32]


class Recorder(nn.Module):
    """Wraps a model and keeps the last input it saw."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.detach().clone()
        return self.inner(x)


# ---------------------------------------------------------------------- the pure losses


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def reference_trades(clean, adv, y, beta) -> float:
    """Zhang et al. 2019: mean over i of CE(f(x_i), y_i) + beta * sum_k p_k log(p_k / q_k)."""
    total = 0.0
    for i in range(len(y)):
        p, q = _softmax(clean[i]), _softmax(adv[i])
        kl = sum(p[k] * math.log(p[k] / q[k]) for k in range(len(p)))
        total += -math.log(p[y[i]]) + beta * kl
    return total / len(y)


def reference_mart(clean, adv, y, beta) -> float:
    """Wang et al. 2020: mean over i of -log q_y - log(1 - max_{k!=y} q_k)
    + beta * KL(p || q) * (1 - p_y), with p = p(x), q = p(x')."""
    total = 0.0
    for i in range(len(y)):
        p, q = _softmax(clean[i]), _softmax(adv[i])
        best_other = max(q[k] for k in range(len(q)) if k != y[i])
        bce = -math.log(q[y[i]]) - math.log(1 - best_other)
        kl = sum(p[k] * math.log(p[k] / q[k]) for k in range(len(p)))
        total += bce + beta * kl * (1 - p[y[i]])
    return total / len(y)


@pytest.fixture
def logits_pair():
    generator = torch.Generator().manual_seed(3)
    clean = torch.randn(7, 5, generator=generator, dtype=torch.float64) * 3
    adv = torch.randn(7, 5, generator=generator, dtype=torch.float64) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    adv[0] = torch.tensor([4.0, 1.0, -1.0, 0.5, 2.0], dtype=torch.float64)  # true class on top
    adv[1] = torch.tensor([3.0, 1.0, -1.0, 0.5, 2.0], dtype=torch.float64)  # another class on top
    return clean, adv, y


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_trades_loss_matches_the_papers_formula(logits_pair, beta):
    clean, adv, y = logits_pair
    value = trades_loss(clean, adv, y, beta)
    assert value.dim() == 0
    expected = reference_trades(clean.numpy(), adv.numpy(), y.tolist(), beta)
    assert value.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_mart_loss_matches_the_papers_formula(logits_pair, beta):
    clean, adv, y = logits_pair
    value = mart_loss(clean, adv, y, beta)
    assert value.dim() == 0
    expected = reference_mart(clean.numpy(), adv.numpy(), y.tolist(), beta)
    assert value.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_trades_and_mart_losses_are_finite_and_differentiable_on_saturated_logits():
    clean = torch.tensor([[200.0, 0.0, -50.0], [0.0, 300.0, 0.0]], requires_grad=True)
    adv = torch.tensor([[-100.0, 150.0, 0.0], [0.0, 0.0, 400.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    for fn in (trades_loss, mart_loss):
        value = fn(clean, adv, y, 6.0)
        (g_clean, g_adv) = torch.autograd.grad(value, (clean, adv))
        assert bool(torch.isfinite(value))
        assert bool(torch.isfinite(g_clean).all()) and bool(torch.isfinite(g_adv).all())
        assert value.item() > 100  # both examples are broken by a wide margin


def test_losses_vanish_only_when_both_inputs_are_confidently_right():
    y = torch.tensor([0, 1])
    confident = torch.tensor([[30.0, 0.0, 0.0], [0.0, 30.0, 0.0]])
    assert trades_loss(confident, confident, y, 6.0).item() == pytest.approx(0.0, abs=1e-6)
    assert mart_loss(confident, confident, y, 6.0).item() == pytest.approx(0.0, abs=1e-6)
    # same logits on x and x' but a wrong prediction: no KL, the cross-entropy remains
    wrong = confident[[1, 0]]
    assert trades_loss(wrong, wrong, y, 6.0).item() > 10
    assert mart_loss(wrong, wrong, y, 6.0).item() > 10


# ---------------------------------------------------------------------- registry and options


def test_every_method_is_registered_with_a_docstring():
    assert set(ALL) <= set(METHODS)
    for name in ALL:
        assert METHODS[name].__doc__


@pytest.mark.parametrize(
    "name, options",
    [
        ("trades", {"beta": -1.0}),
        ("mart", {"beta": -0.5}),
        ("trades", {"beta": float("nan")}),
        ("mart", {"beta": "six"}),
        ("distillation", {"temperature": 0}),
        ("distillation", {"temperature": -3.0}),
        ("distillation", {"temperature": float("inf")}),
        ("free", {"replays": 0}),
        ("free", {"replays": 2.5}),
        ("free", {"replays": True}),
        ("free", {"step_size": -0.1}),
        ("fgsm-rs", {"step_size": float("nan")}),
        ("trades", {"steps": 0}),
        ("mart", {"step_size": -1.0}),
        ("trades", {"temperature": 3.0}),  # an option of another method
        ("free", {"beta": 1.0}),
    ],
)
def test_bad_options_are_one_line_errors(name, options):
    threat = ThreatModel(norm="linf", eps=EPS)
    with pytest.raises(AdvtrainError) as info:
        make_method(name, threat, **options)
    assert "\n" not in str(info.value)
    assert str(info.value)


def test_defaults_follow_the_papers():
    threat = ThreatModel(norm="linf", eps=0.2)
    free = make_method("free", threat)
    assert isinstance(free, Free)
    assert free.replays == 8 and free.step_size == pytest.approx(0.2)
    distill = make_method("distillation", threat)
    assert isinstance(distill, Distillation) and distill.temperature == 100.0
    assert make_method("free", threat, replays=3, step_size=0.05).replays == 3


# ---------------------------------------------------------------------- 1-epoch digits runs


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_methods_beat_standard_training_under_pgd(name, digits, trained):
    """Same seed, same data, one epoch (free: one epoch of 8 replays): PGD-10 robust accuracy
    on the validation split at linf eps 0.2 beats the standard-trained model's."""
    standard = robust_accuracy(trained("standard"), digits)
    robust = robust_accuracy(trained(name), digits)
    assert robust > standard + 0.05, (name, robust, standard)


def test_standard_training_learns(digits, trained):
    model = trained("standard")
    with torch.no_grad():
        accuracy = float((model(digits.val.x).argmax(1) == digits.val.y).float().mean())
    assert accuracy > 0.7


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_inputs_stay_in_a_masked_threat_model(name, batch):
    """The inputs a method trains on (the model's last forward pass) lie in the ball, inside
    the bounds, and leave masked features untouched; the model's state is restored."""
    x, y = batch
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[..., :4] = True  # only the left half of the image may change
    threat = ThreatModel(norm="linf", eps=EPS, mask=mask)
    model = Recorder(fresh_model())
    model.train()
    loss_fn = make_method(name, threat)
    for _ in range(3):  # free AT moves its perturbation only from the second call on
        loss, _ = loss_fn(model, x, y)
        assert model.training and all(p.requires_grad for p in model.parameters())
        assert all(p.grad is None for p in model.parameters())  # no leak from the attack
        loss.backward()
        model.zero_grad(set_to_none=True)
    seen = model.seen
    assert bool(threat.contains(seen, x).all())
    assert float((seen - x).abs().max()) > EPS / 2  # it did move
    assert torch.equal(seen[..., 4:], x[..., 4:])


def test_distillation_saturates_the_softmax_and_masks_ce_gradients(digits, trained):
    """Six epochs (three as the teacher, three on its soft labels at T = 100): deployed at
    T = 1 the softmax saturates, PGD on cross-entropy finds almost nothing, and PGD on the CW
    margin shows the robustness is false."""
    model = trained("distillation", epochs=6)
    with torch.no_grad():
        logits = model(digits.val.x)
    spread = logits.max(dim=1).values - logits.min(dim=1).values
    assert float(spread.median()) > 100
    assert float(logits.softmax(dim=1).max(dim=1).values.mean()) > 0.99
    ce, cw = robust_accuracy(model, digits, "ce"), robust_accuracy(model, digits, "cw")
    assert ce > cw + 0.3, (ce, cw)
    assert cw < robust_accuracy(trained("pgd"), digits)


def test_distillation_phases(batch):
    x, y = batch
    model = fresh_model()
    loss_fn = make_method("distillation", ThreatModel(eps=EPS), temperature=20.0)
    loss, logits = loss_fn(model, x, y)  # no on_epoch_start: the first phase
    torch.testing.assert_close(loss, F.cross_entropy(model(x) / 20.0, y))
    torch.testing.assert_close(logits, model(x))
    for epoch in (1, 2):
        loss_fn.on_epoch_start(model, epoch, 4)
        assert loss_fn.teacher is None
    loss_fn.on_epoch_start(model, 3, 4)
    teacher = loss_fn.teacher
    assert teacher is not None and teacher is not model and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    snapshot = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)  # the student moves on, the teacher does not
    loss_fn.on_epoch_start(model, 4, 4)
    assert loss_fn.teacher is teacher
    loss, logits = loss_fn(model, x, y)
    with torch.no_grad():
        soft = (snapshot(x) / 20.0).softmax(dim=1)
    expected = -(soft * (model(x) / 20.0).log_softmax(dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits, model(x))
    loss_fn.on_epoch_start(model, 1, 4)  # a new run starts over
    assert loss_fn.teacher is None


def test_distillation_with_one_epoch_is_the_teacher_phase():
    loss_fn = make_method("distillation", ThreatModel(eps=EPS))
    loss_fn.on_epoch_start(fresh_model(), 1, 1)
    assert loss_fn.teacher is None
    with pytest.raises(AdvtrainError):
        loss_fn.on_epoch_start(fresh_model(), 0, 1)


# ---------------------------------------------------------------------- free AT


def test_free_carries_delta_across_calls_and_updates_it_from_backward(digits):
    threat = digits.info.threat_model(norm="linf", eps=EPS)
    loss_fn = make_method("free", threat, replays=3)
    assert loss_fn.replays == 3
    model = fresh_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = digits.train.x[:32], digits.train.y[:32]
    loss, _ = loss_fn(model, x, y)
    assert torch.equal(loss_fn.delta.detach(), torch.zeros_like(x))  # starts from zero
    history = []
    for call in range(6):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        grad = loss_fn.delta.grad.clone()
        before = loss_fn.delta.detach().clone()
        batch = slice(0, 32) if call < 3 else slice(32, 64)  # replays, then the next minibatch
        x, y = digits.train.x[batch], digits.train.y[batch]
        loss, _ = loss_fn(model, x, y)
        delta = loss_fn.delta.detach()
        torch.testing.assert_close(delta, (before + EPS * grad.sign()).clamp(-EPS, EPS))
        assert float(delta.abs().max()) <= EPS + 1e-6
        history.append(delta.clone())
    assert float(history[-1].abs().max()) == pytest.approx(EPS)  # carried, and grown to eps
    assert not torch.equal(history[2], history[3])  # still moving on the next minibatch
    loss_fn(model, digits.train.x[:16], digits.train.y[:16])  # another batch shape: restart
    assert torch.equal(loss_fn.delta.detach(), torch.zeros(16, 1, 8, 8))


def test_free_respects_l2_ball_bounds_and_mask(digits):
    mask = torch.ones(1, 8, 8)
    mask[..., 0, :] = 0  # the top row may not change
    threat = ThreatModel(norm="l2", eps=1.5, mask=mask)
    loss_fn = make_method("free", threat, step_size=1.0)
    model = Recorder(fresh_model())
    x, y = digits.train.x[:32], digits.train.y[:32]
    for _ in range(5):
        loss, _ = loss_fn(model, x, y)
        loss.backward()
        delta = loss_fn.delta.detach()
        assert bool((delta.flatten(1).norm(dim=1) <= 1.5 + 1e-5).all())
        assert torch.equal(delta[..., 0, :], torch.zeros_like(delta[..., 0, :]))
        assert bool(threat.contains(model.seen, x).all())
    assert float(delta.flatten(1).norm(dim=1).max()) > 1.0


def test_free_l1_step_leaves_out_what_the_box_blocks():
    """On l1 the sparse step goes to the largest |gradient| the box lets move: pixels at 0 with a
    negative gradient would take the whole step and be clamped straight back."""
    threat = ThreatModel(norm="l1", eps=2.0)
    loss_fn = make_method("free", threat, step_size=1.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(100, 3))
    x, y = torch.zeros(2, 1, 10, 10), torch.tensor([0, 1])  # every pixel at the lower bound
    x[:, :, 5:] = 0.5
    loss_fn(model, x, y)
    grad = torch.zeros_like(x)
    grad[:, :, :5] = -10.0  # blocked: at 0 and pushed down
    grad[:, 0, 7, 3] = 1.0  # the largest gradient that can move
    loss_fn.delta.grad = grad
    loss_fn(model, x, y)
    delta = loss_fn.delta.detach()
    assert float(delta[:, 0, 7, 3].min()) == pytest.approx(1.0)
    assert float(delta.abs().sum()) == pytest.approx(2.0)  # the whole step, on both points
    assert bool((delta[:, :, :5] == 0).all())


def test_free_replays_are_honoured_by_the_loop(digits):
    """With replays m the loop calls the loss m times per minibatch and runs ceil(E / m) epochs."""
    loss_fn = make_method("free", digits.info.threat_model(eps=EPS), replays=4)
    calls = []

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = fresh_model()

        def forward(self, x):
            calls.append(len(x))
            return self.inner(x)

    model = Counting()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = digits.train.x[:128], digits.train.y[:128]
    epochs = 6
    for _ in range(math.ceil(epochs / loss_fn.replays)):
        for index in torch.arange(128).split(64):
            for _ in range(loss_fn.replays):
                loss, _ = loss_fn(model, x[index], y[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    assert len(calls) == 2 * 2 * 4  # 2 epochs x 2 minibatches x 4 replays, one forward each


# ---------------------------------------------------------------------- mix


def test_mix_zero_is_standard_cross_entropy(batch):
    x, y = batch
    model = fresh_model()
    threat = ThreatModel(eps=EPS)
    for name in ALL:
        loss, logits = mix(make_method(name, threat), 0.0)(model, x, y)
        expected, expected_logits = make_method("standard", threat)(model, x, y)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(logits, expected_logits)


@pytest.mark.parametrize("name", ALL)
def test_mix_one_is_the_method(name, batch):
    x, y = batch
    model = fresh_model()
    model.train()
    threat = ThreatModel(eps=EPS)
    torch.manual_seed(1)
    loss, logits = make_method(name, threat)(model, x, y)
    torch.manual_seed(1)
    mixed_loss, mixed_logits = mix(make_method(name, threat), 1.0)(model, x, y)
    torch.testing.assert_close(mixed_loss, loss)
    torch.testing.assert_close(mixed_logits, logits)


def test_mix_weights_the_two_losses(batch):
    x, y = batch
    model = fresh_model()
    threat = ThreatModel(eps=EPS)
    torch.manual_seed(1)
    adversarial, logits = make_method("pgd", threat)(model, x, y)
    clean = F.cross_entropy(model(x), y)
    torch.manual_seed(1)
    mixed, mixed_logits = mix(make_method("pgd", threat), 0.3)(model, x, y)
    torch.testing.assert_close(mixed, 0.3 * adversarial + 0.7 * clean)
    torch.testing.assert_close(mixed_logits, logits)
    assert not torch.allclose(mixed, adversarial)


def test_mix_keeps_the_trainer_contract():
    threat = ThreatModel(eps=EPS)
    free = make_method("free", threat, replays=5)
    mixed = mix(free, 0.5)
    assert isinstance(mixed, Method)
    assert mixed.replays == 5 and mixed.method is free
    mixed.set_eps(0.1)  # the eps schedule reaches the wrapped method
    assert free.eps == mixed.eps == 0.1 and free.step_size == pytest.approx(0.1)
    distill = make_method("distillation", threat)
    mix(distill, 0.5).on_epoch_start(fresh_model(), 2, 2)
    assert distill.teacher is not None
    plain = mix(make_method("pgd", threat), 0.5)
    assert plain.replays == 1 and plain.state_dict() == {}


def test_mixed_free_still_moves_its_perturbation(batch):
    x, y = batch
    free = make_method("free", ThreatModel(eps=EPS))
    mixed = mix(free, 0.5)
    model = fresh_model()
    for _ in range(2):
        loss, _ = mixed(model, x, y)
        loss.backward()
    assert float(free.delta.detach().abs().max()) == pytest.approx(EPS)


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan"), "half", None])
def test_mix_rejects_bad_ratios(ratio):
    with pytest.raises(AdvtrainError) as info:
        mix(make_method("pgd", ThreatModel(eps=EPS)), ratio)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------- the Method protocol


def test_set_eps_is_the_method_rebuilt_for_that_eps(batch):
    """Following an eps schedule: a method moved to eps e computes what one built at e does
    (derived step sizes included), and keeps the state it carries."""
    x, y = batch
    model = fresh_model()
    for name in ("pgd", "fgsm-rs", "trades", "mart", "free"):
        moved = make_method(name, ThreatModel(eps=EPS))
        moved.set_eps(0.05)
        built = make_method(name, ThreatModel(eps=0.05))
        assert moved.eps == built.eps == 0.05
        torch.manual_seed(3)
        loss, logits = moved(model, x, y)
        torch.manual_seed(3)
        expected, expected_logits = built(model, x, y)
        assert torch.equal(loss, expected) and torch.equal(logits, expected_logits), name
    free = make_method("free", ThreatModel(eps=EPS))
    free(model, x, y)[0].backward()
    delta = free.delta
    free.set_eps(0.1)
    assert free.delta is delta and free.step_size == pytest.approx(0.1)


def test_state_dict_round_trip_restores_free_and_distillation(batch):
    x, y = batch
    model = fresh_model()
    free = make_method("free", ThreatModel(eps=EPS), replays=2)
    assert free.state_dict() == {}
    for _ in range(2):
        free(model, x, y)[0].backward()
    state = free.state_dict()
    assert set(state) == {"delta", "delta.grad"}
    twin = make_method("free", ThreatModel(eps=EPS), replays=2)
    twin.load_state_dict(state, model)
    assert twin.delta.requires_grad and torch.equal(twin.delta.grad, free.delta.grad)
    assert torch.equal(twin(model, x, y)[0], free(model, x, y)[0])
    distill = make_method("distillation", ThreatModel(eps=EPS))
    distill.on_epoch_start(model, 2, 2)
    copy_ = make_method("distillation", ThreatModel(eps=EPS))
    copy_.load_state_dict(distill.state_dict(), fresh_model(seed=9))
    assert copy_.teacher is not None and not copy_.teacher.training
    assert not any(p.requires_grad for p in copy_.teacher.parameters())
    torch.testing.assert_close(copy_(model, x, y)[0], distill(model, x, y)[0])
    with pytest.raises(AdvtrainError):  # a stateless method refuses state it does not keep
        make_method("pgd", ThreatModel(eps=EPS)).load_state_dict(state, model)


def test_a_factory_must_return_a_method(monkeypatch):
    monkeypatch.setitem(METHODS, "test-plain", lambda threat, **options: lambda m, x, y: None)
    with pytest.raises(AdvtrainError, match="not a Method"):
        make_method("test-plain", ThreatModel(eps=EPS))

    class Broken(Method):
        replays = 0

        def loss(self, model, x, y):
            raise AssertionError

    monkeypatch.setitem(METHODS, "test-broken", lambda threat, **options: Broken(threat))
    with pytest.raises(AdvtrainError, match="replays"):
        make_method("test-broken", ThreatModel(eps=EPS))
