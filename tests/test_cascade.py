"""The survivor cascade's bookkeeping: margins for every correct point, runs on chosen survivors."""

from __future__ import annotations

import hashlib

import torch

from advtrain.attacks import FABT, PGD
from advtrain.evaluation.cascade import Cascade
from advtrain.evaluation.context import argmax
from advtrain.evaluation.escalation import RULES
from advtrain.evaluation.findings import VERDICT, WARNING, Check, CheckName
from advtrain.evaluation.shards import step_seed
from advtrain.evaluation.steps import Step, suite_attacks
from advtrain.threat import ThreatModel

torch.set_num_threads(1)
EPS = 0.1


def _cascade(model, x, y, threat):
    pred = argmax(model, x, 100)
    return Cascade(x, y, threat, lambda p: argmax(model, p, 100), (pred == y).cpu(), pred.clone())


def test_minimum_norm_step_measures_every_correct_point_but_breaks_only_survivors(
    digits, digits_model
):
    x, y = digits.test.x[:60], digits.test.y[:60]
    threat = ThreatModel(norm="linf", eps=EPS)
    state = _cascade(digits_model, x, y, threat)
    correct = state.correct.clone()
    state.run(Step("pgd", PGD(threat, steps=10, seed=0)), digits_model)
    by_pgd = (~state.standing & correct).clone()
    assert 0 < int(by_pgd.sum()) < int(correct.sum())
    pgd_norms = state.norm[by_pgd].clone()
    fab = Step("fab-t", FABT(threat.replace(eps=float("inf")), n_targets=2, seed=0), min_norm=True)
    state.run(fab, digits_model)
    assert torch.equal(state.measured, correct)  # every correct point got its margin
    assert bool(torch.isfinite(state.margin[correct]).all())
    assert bool((state.margin[by_pgd] <= pgd_norms + 1e-6).all())
    assert bool((state.margin[~correct] == 0).all())
    # points PGD broke keep PGD as what broke them; FAB-T breaks only survivors within eps
    assert all(state.broken_by[i] == "pgd" for i in by_pgd.nonzero().squeeze(1).tolist())
    for i in (~state.standing & correct & ~by_pgd).nonzero().squeeze(1).tolist():
        assert state.broken_by[i] == "fab-t" and float(state.norm[i]) <= EPS + 1e-6
    assert bool((state.margin[state.standing] > EPS * (1 - 1e-6)).all())


def test_a_run_among_chosen_points_attacks_only_those(digits, digits_model):
    x, y = digits.test.x[:60], digits.test.y[:60]
    threat = ThreatModel(norm="linf", eps=0.3)
    state = _cascade(digits_model, x, y, threat)
    assert torch.equal(state.closest_standing(0.25, least=5), state.indices())  # none measured
    state.margin[state.standing] = torch.linspace(1.0, 2.0, int(state.standing.sum()))
    state.measured[state.standing] = True
    chosen = state.closest_standing(0.25, least=5)
    standing = state.indices()
    assert len(chosen) == max(5, -(-len(standing) // 4))
    assert torch.equal(chosen, standing[: len(chosen)])  # the smallest margins come first
    state.run(Step("pgd", PGD(threat, steps=20, seed=0)), digits_model, among=chosen)
    broken = (~state.standing & state.correct).nonzero().squeeze(1)
    assert len(broken) > 0 and bool(torch.isin(broken, chosen).all())
    assert len(state.closest_standing(0.25, least=10**6)) == int(state.standing.sum())


def test_standard_suite_aims_targeted_steps_at_few_classes_and_thorough_fab_t_at_nine():
    threat = ThreatModel(norm="linf", eps=0.3)
    fab = {
        suite: next(s for s in suite_attacks(suite, threat, 10, 0) if s.name == "fab-t")
        for suite in ("standard", "thorough")
    }
    assert fab["standard"].min_norm and fab["standard"].attack.n_targets == 3
    assert fab["thorough"].attack.n_targets == 9
    assert not fab["standard"].attack.threat.bounded
    apgd_t = next(s for s in suite_attacks("standard", threat, 10, 0) if s.name == "apgd-t")
    assert apgd_t.attack.n_targets == 4


def test_each_step_is_seeded_from_its_name():
    threat = ThreatModel(norm="linf", eps=0.3)
    steps = suite_attacks("thorough", threat, 10, 7)
    assert [s.attack.seed for s in steps] == [step_seed(7, s.name) for s in steps]
    assert len({s.attack.seed for s in steps}) == len(steps)
    digest = hashlib.sha256(b"apgd-ce").digest()
    assert step_seed(7, "apgd-ce") == 7 + int.from_bytes(digest[:4], "big")
    # a step seeded within a scope (an escalation rule) differs from the cascade's namesake
    square = next(s for s in steps if s.name == "square 10k x2")
    assert square.seeded(7, "masking: ").attack.seed != square.attack.seed
    assert square.attack.seed == step_seed(7, "square 10k x2")  # seeded() copies the attack


def test_escalation_rules_name_checks_and_rules_that_exist():
    names = [rule.name for rule in RULES]
    assert len(set(names)) == len(names)
    for rule in RULES:
        assert rule.checks and all(isinstance(c, CheckName) for c in rule.checks)
        assert rule.unless <= set(names) and rule.norms <= {"linf", "l2", "l1"}
        assert all(p.when is None or p.when in rule.checks for p in rule.steps)
    masking = next(rule for rule in RULES if rule.name == "masking")
    found = [
        Check(CheckName.BLACK_BOX, True, "", WARNING),
        Check(CheckName.ZERO_GRADIENTS, True, "", VERDICT),
        Check(CheckName.UNBOUNDED, False, "", VERDICT),
    ]
    assert masking.fired(found) == {CheckName.ZERO_GRADIENTS}  # verdicts only
    second = next(rule for rule in RULES if rule.name == "second square")
    assert second.fired(found) == {CheckName.BLACK_BOX}
    assert found[0].name == "black-box stronger than white-box"  # stored as the report's string
