"""FGSM and PGD: threat-model invariants for every attack, and behaviour on a real small model."""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from advtrain import ThreatModel
from advtrain.attacks import APGD, APGDDLR, APGDT, ATTACKS, FGSM, PGD, Attack, Outcome, make_attack
from advtrain.attacks.apgd import checkpoint_schedule
from advtrain.device_sync import compact_every
from advtrain.errors import AdvtrainError, UnknownNameError
from advtrain.evaluation import predict

ATTACK_NAMES = sorted(ATTACKS)
#: Small budgets, passed to each attack that takes the keyword (shared names across attacks).
SMALL_BUDGETS = {"steps": 3, "n_queries": 30, "binary_search_steps": 2}


def small_budget(cls: type[Attack]) -> dict[str, int]:
    """The keywords of :data:`SMALL_BUDGETS` that ``cls`` (or a base class) accepts."""
    accepted: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            accepted |= set(inspect.signature(vars(klass)["__init__"]).parameters)
    return {k: v for k, v in SMALL_BUDGETS.items() if k in accepted}


def _tiny_model(seed: int, features: int, classes: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


def _labels_mostly_right(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own predictions, except the first point's (so it is misclassified): the
    attacks run on every other point, and leave the first one alone."""
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % model[-1].out_features
    return y


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(ATTACK_NAMES),
    norm=st.sampled_from(["linf", "l2", "l1"]),
    eps=st.floats(0.0, 3.0),
    shape=st.sampled_from([(6,), (1, 4, 4)]),
    per_feature=st.booleans(),
    masked=st.booleans(),
    targeted=st.booleans(),
    restarts=st.integers(1, 2),
    seed=st.integers(0, 2**16),
    accelerator_path=st.booleans(),
)
def test_every_attack_stays_inside_its_threat_model(
    name, norm, eps, shape, per_feature, masked, targeted, restarts, seed, accelerator_path
):
    assume(norm in ATTACKS[name].norms)
    g = torch.Generator().manual_seed(seed)
    lower = torch.rand(shape, generator=g) - 0.5 if per_feature else 0.0
    upper = lower + torch.rand(shape, generator=g) + 0.1 if per_feature else 1.0
    mask = torch.rand(shape, generator=g) > 0.4 if masked else None
    threat = ThreatModel(norm, eps, lower, upper, mask)
    lo, hi = torch.as_tensor(lower), torch.as_tensor(upper)
    x = lo + (hi - lo) * torch.rand((5, *shape), generator=g)
    features = int(torch.tensor(shape).prod())
    model = _tiny_model(seed, features, 3)
    y = _labels_mostly_right(model, x)
    target = (y + 1) % 3 if targeted else None
    extra = {}
    if name == "transfer":  # crafted on another small model, judged on this one
        extra = {"surrogate": _tiny_model(seed + 1, features, 3), "attack_options": {"steps": 3}}
    attack = make_attack(
        name, threat=threat, restarts=restarts, seed=seed, **small_budget(ATTACKS[name]), **extra
    )
    with compact_every(7 if accelerator_path else 1):  # the loops' GPU schedule, on the CPU
        x_adv = attack(model, x, y, target=target)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert bool(threat.contains(x_adv, x).all())


class _Detached(nn.Module):
    """A model whose output is cut off from autograd's graph of its input (a step done outside
    torch, say): gradient attacks must see a zero gradient, not raise."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.detach())


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_every_attack_runs_on_a_model_without_input_gradients(name):
    threat = ThreatModel("linf" if "linf" in ATTACKS[name].norms else ATTACKS[name].norms[0], 0.3)
    x = torch.rand(6, 1, 4, 4)
    model = _Detached(_tiny_model(0, 16, 3))
    y = _labels_mostly_right(model.model, x)
    extra = {}
    if name == "transfer":
        extra = {"surrogate": _tiny_model(1, 16, 3), "attack_options": {"steps": 3}}
    attack = make_attack(name, threat=threat, seed=0, **small_budget(ATTACKS[name]), **extra)
    x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape and bool(threat.contains(x_adv, x).all())


def test_attack_restores_model_state_and_leaves_no_gradients():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    model[0].weight.requires_grad_(False)  # a frozen layer must stay frozen, the rest trainable
    model[3].weight.grad = torch.full_like(model[3].weight, 7.0)  # an existing gradient survives
    running_mean = model[1].running_mean.clone()
    x, y = torch.rand(10, 4), torch.randint(0, 3, (10,))
    PGD(eps=0.1, steps=5)(model, x, y)
    assert model.training and model[1].training
    assert [p.requires_grad for p in model.parameters()] == [False, True, True, True, True, True]
    assert torch.equal(model[3].weight.grad, torch.full_like(model[3].weight, 7.0))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "3.weight")
    assert torch.equal(model[1].running_mean, running_mean)  # attacked in eval mode


def test_overlapping_freezes_of_one_model_restore_the_state_from_before_the_first():
    """Two threads attacking one model: the second freezes an already frozen model, and the state
    it must restore is the one from before the first freeze, after the last one leaves (saving
    and restoring per call left the parameters frozen for good)."""
    import threading

    from advtrain.attacks import frozen

    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[tuple[bool, bool]] = []

    def first() -> None:
        with frozen(model):
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        with frozen(model):
            second_in.set()
            first_out.wait(10)
            # still frozen while this call runs (read here, asserted in the main thread)
            seen.append((model.training, any(p.requires_grad for p in model.parameters())))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == [(False, False)]
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    with frozen(model), frozen(model):  # nested in one thread, as an attack inside an attack
        assert not any(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_attack_restores_each_submodule_s_own_mode():
    inner = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).eval()
    wrapper = nn.Sequential(inner)  # a fresh wrapper is in training mode, its content is not
    assert wrapper.training and not inner.training
    PGD(eps=0.1, steps=3)(wrapper, torch.rand(6, 4), torch.randint(0, 3, (6,)))
    assert wrapper.training
    assert not any(m.training for m in inner.modules())  # dropout stays off for the user


def test_attack_restores_state_even_when_it_fails():
    model = nn.Sequential(nn.Linear(4, 3)).train()
    with pytest.raises(RuntimeError):
        PGD(eps=0.1)(model, torch.rand(2, 5), torch.zeros(2, dtype=torch.int64))  # wrong width
    assert model.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "attack",
    [
        FGSM(eps=0.3),
        PGD(eps=0.3, steps=20, seed=0),
        PGD(norm="l2", eps=3.0, steps=20, seed=0),
        PGD(norm="l1", eps=6.0, steps=100, seed=0),
        APGD(eps=0.3, steps=20, seed=0),
        APGDDLR(eps=0.3, steps=20, seed=0),
        APGD(norm="l2", eps=3.0, steps=20, seed=0),
        APGDT(eps=0.3, steps=10, n_targets=3, seed=0),
    ],
    ids=repr,
)
def test_attacks_break_an_undefended_model(digits_model, digits, attack):
    x, y = digits.test.x, digits.test.y
    clean = float((predict(digits_model, x) == y).float().mean())
    robust = float((predict(digits_model, attack(digits_model, x, y)) == y).float().mean())
    assert clean > 0.9
    assert robust < (0.35 if isinstance(attack, FGSM) else 0.02)


def test_targeted_pgd_hits_its_targets(digits_model, digits):
    x, y = digits.test.x[:100], digits.test.y[:100]
    target = (y + 3) % 10
    x_adv = PGD(eps=0.4, steps=40, step_size=0.02, seed=0)(digits_model, x, y, target=target)
    assert float((predict(digits_model, x_adv) == target).float().mean()) > 0.95


def test_pgd_is_stronger_than_fgsm_and_restarts_never_hurt(digits_model, digits):
    x, y = digits.test.x, digits.test.y
    eps = 0.1

    def robust(attack: Attack) -> float:
        return float((predict(digits_model, attack(digits_model, x, y)) == y).float().mean())

    fgsm, pgd1, pgd3 = (
        robust(FGSM(eps=eps)),
        robust(PGD(eps=eps, seed=1)),
        robust(PGD(eps=eps, restarts=3, seed=1)),
    )
    assert pgd1 < fgsm
    assert pgd3 <= pgd1


@pytest.mark.parametrize("name", [n for n in ATTACK_NAMES if n != "transfer"])
def test_points_already_misclassified_are_left_alone(name):
    """As in AutoAttack: a point the model gets wrong is returned as it is (Square and
    HopSkipJump find that with their first, counted, query). The random attacks but PGD (which
    draws every point's start, as Madry et al.'s code) draw nothing for it, so the other points
    get what they get when attacked on their own."""
    threat = ThreatModel("linf" if "linf" in ATTACKS[name].norms else ATTACKS[name].norms[0], 0.3)
    model = _tiny_model(0, 16, 3)
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = _labels_mostly_right(model, x)
    y[3] = (y[3] + 2) % 3
    wrong = torch.zeros(8, dtype=torch.bool)
    wrong[[0, 3]] = True
    attack = make_attack(name, threat=threat, seed=0, **small_budget(ATTACKS[name]))
    x_adv = attack(model, x, y)
    assert torch.equal(x_adv[wrong], x[wrong])
    assert attack.screens_clean_points == (
        name not in ("square", "feature-search", "hsj", "pgd", "fgsm")
    )
    if attack.screens_clean_points:
        alone = make_attack(name, threat=threat, seed=0, **small_budget(ATTACKS[name]))
        assert torch.equal(x_adv[~wrong], alone(model, x[~wrong], y[~wrong]))


def test_training_pgd_perturbs_points_already_misclassified(digits_model, digits):
    x, y = digits.test.x, digits.test.y
    wrong = predict(digits_model, x) != y
    assert bool(wrong.any())
    x_adv = PGD(eps=0.2, steps=2, early_stop=False)(digits_model, x, y)
    assert not torch.equal(x_adv[wrong], x[wrong])


def test_training_mode_returns_the_last_iterate_for_every_point(digits_model, digits):
    """early_stop=False takes every step on every point, even those misclassified from the start."""
    x, y = digits.test.x[:50], digits.test.y[:50]
    x_adv = PGD(eps=0.2, steps=5, early_stop=False, random_start=False)(digits_model, x, y)
    assert bool(((x_adv - x).abs().flatten(1).amax(1) > 0).all())


def test_batching_and_seeds_are_deterministic(digits_model, digits):
    x, y = digits.test.x[:40], digits.test.y[:40]
    whole = PGD(eps=0.1, steps=5, seed=3)(digits_model, x, y)
    assert torch.equal(whole, PGD(eps=0.1, steps=5, seed=3)(digits_model, x, y))
    no_start = PGD(eps=0.1, steps=5, random_start=False)
    assert torch.allclose(
        no_start(digits_model, x, y),
        PGD(eps=0.1, steps=5, random_start=False, batch_size=7)(digits_model, x, y),
        atol=1e-6,
    )


@pytest.mark.parametrize("every", [1, 20], ids=["cpu-path", "accelerator-path"])
def test_outcome_merge_keeps_the_worst_case_per_sample(every):
    best = Outcome(
        torch.zeros(4, 1),
        torch.tensor([False, False, True, False]),
        torch.tensor([1.0, 5.0, 0.0, 2.0]),
    )
    new = Outcome(
        torch.ones(3, 1), torch.tensor([True, False, False]), torch.tensor([0.0, 9.0, 1.0])
    )
    with compact_every(every):
        best.merge(new, torch.tensor([0, 1, 3]))
    assert best.x_adv.squeeze(1).tolist() == [1.0, 1.0, 0.0, 0.0]  # success wins; higher loss wins
    assert best.success.tolist() == [True, False, True, False]
    assert best.loss.tolist() == [0.0, 9.0, 0.0, 2.0]


def test_fgsm_defaults_follow_goodfellow():
    attack = FGSM(eps=0.25)
    assert attack.steps == 1 and attack.step_size == 0.25 and not attack.random_start


def test_pgd_defaults():
    attack = PGD(eps=0.3)
    assert attack.steps == 40 and attack.step_size == pytest.approx(2.5 * 0.3 / 40)
    assert attack.random_start and attack.loss == "ce"
    assert PGD(eps=0.3, steps=10).step_size == pytest.approx(0.075)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: PGD(), "needs a threat model or an eps"),
        (lambda: PGD(eps=0.1, steps=0), "steps must be a positive integer"),
        (lambda: PGD(eps=0.1, step_size=-1.0), "step_size must be finite"),
        (lambda: PGD(eps=0.1, loss="hinge"), "unknown loss"),
        (lambda: PGD(eps=0.1, restarts=0), "restarts must be a positive integer"),
        (lambda: PGD("linf"), "threat must be a ThreatModel"),
    ],
)
def test_bad_attack_arguments(call, message):
    with pytest.raises(AdvtrainError, match=message):
        call()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_a_misspelt_option_is_one_line_naming_the_attack_and_its_options(name):
    """Through the registry and through the class itself, an option no constructor in the chain
    takes is refused before any work, in one line listing the valid options."""
    from advtrain.attacks.registry import attack_options

    cls = ATTACKS[name]
    options = attack_options(cls)
    assert {"eps", "norm", "restarts", "seed", "batch_size"} <= set(options)
    extra = {"surrogate": _tiny_model(1, 4, 3)} if name == "transfer" else {}
    for build in (
        lambda: make_attack(name, eps=0.1, stepz=3, **extra),
        lambda: cls(eps=0.1, stepz=3, **extra),
    ):
        with pytest.raises(AdvtrainError) as caught:
            build()
        message = str(caught.value)
        assert "\n" not in message and "'stepz'" in message and repr(name) in message
        listed = message.split("its options: ")[1].split(", ")
        assert listed == sorted(set(options) - {"threat"})


def test_attack_options_lists_defaults():
    from advtrain.attacks import CarliniWagnerL2, HopSkipJump, Square
    from advtrain.attacks.registry import attack_options

    apgd = attack_options(APGD)
    assert (apgd["steps"], apgd["rho"], apgd["loss"], apgd["norm"]) == (100, 0.75, "ce", "linf")
    assert attack_options(APGDT)["loss"] == "dlr" and attack_options(APGDT)["n_targets"] is None
    assert attack_options(CarliniWagnerL2)["norm"] == "l2"
    assert attack_options(HopSkipJump)["norm"] == "l2"
    assert attack_options(Square)["n_queries"] == 5000
    with pytest.raises(AdvtrainError, match=r"'pgd' .* no option 'stepz', 'rhoo'"):
        make_attack("pgd", eps=0.1, stepz=3, rhoo=1)


def test_bad_attack_inputs():
    model = _tiny_model(0, 4, 3)
    attack = PGD(eps=0.1, steps=2)
    with pytest.raises(AdvtrainError, match="y must have shape"):
        attack(model, torch.rand(3, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(AdvtrainError, match="integer class labels"):
        attack(model, torch.rand(3, 4), torch.zeros(3))
    with pytest.raises(AdvtrainError, match="floating-point"):
        attack(model, torch.ones(3, 4, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(AdvtrainError, match="outside the threat model's bounds"):
        attack(model, torch.full((3, 4), 3.0), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(
        UnknownNameError,
        match=(
            "choose one of: apgd-ce, apgd-dlr, apgd-t, cw-l2, deepfool, fab, fab-t, "
            "feature-search, fgsm, hsj, pgd, square"
        ),
    ):
        make_attack("deepfool-9000", eps=0.1)


def test_apgd_targeted_dlr_hits_its_targets(digits_model, digits):
    x, y = digits.test.x[:100], digits.test.y[:100]
    target = (y + 3) % 10
    x_adv = APGDDLR(eps=0.4, steps=50, seed=0)(digits_model, x, y, target=target)
    assert float((predict(digits_model, x_adv) == target).float().mean()) > 0.95


def test_apgd_defaults_and_schedule_follow_croce_hein():
    attack = APGD(eps=0.3)
    assert attack.steps == 100 and attack.loss == "ce" and attack.rho == 0.75
    assert attack.momentum == 0.75 and APGDDLR(eps=0.3).loss == "dlr"
    assert checkpoint_schedule(100) == (22, 3, 6)
    with pytest.raises(AdvtrainError, match="supports the norms linf, l2"):
        APGD(norm="l1", eps=1.0)


def test_apgd_is_at_least_as_strong_as_pgd_with_the_same_budget(digits_model, digits):
    x, y = digits.test.x, digits.test.y

    def robust(attack: Attack) -> float:
        return float((predict(digits_model, attack(digits_model, x, y)) == y).float().mean())

    assert robust(APGD(eps=0.1, steps=40, seed=0)) <= robust(PGD(eps=0.1, steps=40, seed=0)) + 0.005


def test_apgdt_aims_at_every_other_class_by_default(monkeypatch):
    """k follows the number of classes (7 here, not AutoAttack's fixed 9), best-ranked first,
    never the true class, and only the points still standing are attacked again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8))
    x = torch.rand(6, 5)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point classified correctly, so every point is attacked
    seen: list[torch.Tensor] = []
    original = APGD.descend

    def spy(self, model, x, y, target, generator, *, success_target):
        seen.append(target.clone())
        assert success_target is None and bool((target != y).all())  # success = misclassified
        return original(self, model, x, y, target, generator, success_target=success_target)

    monkeypatch.setattr(APGD, "descend", spy)
    APGDT(eps=0.0, steps=2)(model, x, y)  # eps 0: nothing can succeed, every target is tried
    assert len(seen) == 7
    with torch.no_grad():
        logits = model(x)
    second = logits.scatter(1, y[:, None], float("-inf")).argmax(1)
    assert torch.equal(seen[0], second)


def test_only_minimum_norm_attacks_accept_an_unbounded_threat():
    with pytest.raises(AdvtrainError, match="needs a finite eps"):
        PGD(eps=float("inf"))
    with pytest.raises(AdvtrainError, match="needs a threat model or an eps"):
        PGD()


def test_progress_bar_is_optional_and_does_not_change_results(capsys):
    model = _tiny_model(0, 6, 3)
    x, y = torch.rand(12, 6), torch.randint(0, 3, (12,))
    quiet = PGD(eps=0.2, steps=4, seed=1, batch_size=5)(model, x, y)
    shown = PGD(eps=0.2, steps=4, seed=1, batch_size=5, progress=True)(model, x, y)
    assert torch.equal(quiet, shown)
    assert capsys.readouterr().out == ""  # the bar never pollutes standard output


def test_min_norm_base_keeps_the_smallest_success_and_projects_into_eps():
    from advtrain.attacks.base import MinNormAttack

    class Scale(MinNormAttack):
        """Moves each point straight away from its class's direction by a random factor."""

        def minimize(self, model, x, y, target, generator):
            factor = torch.rand(len(x), 1, generator=generator) * 2
            return x + factor * torch.ones_like(x)

    class Threshold(nn.Module):  # class 1 when the mean feature exceeds 1, else 0
        def forward(self, x):
            score = x.mean(dim=1, keepdim=True) - 1.0
            return torch.cat([-score, score], dim=1)

    x = torch.full((50, 4), 0.5)
    y = torch.zeros(50, dtype=torch.int64)
    one = Scale(norm="linf", upper=5.0, seed=0).min_norm(Threshold(), x, y)
    many = Scale(norm="linf", upper=5.0, seed=0, restarts=5).min_norm(Threshold(), x, y)
    assert torch.isinf(one.norm[~one.success]).all() and one.success.any()
    assert torch.equal(one.x_adv[~one.success], x[~one.success])
    assert bool((many.norm <= one.norm).all()) and many.success.sum() >= one.success.sum()
    assert bool((many.norm[many.success] > 0.5).all())  # they are real successes, at >= 0.5
    bounded = Scale(norm="linf", eps=0.7, upper=5.0, seed=0, restarts=5)
    x_adv = bounded(Threshold(), x, y)
    assert bool(bounded.threat.contains(x_adv, x).all())
