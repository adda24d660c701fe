"""The survivor cascade's bookkeeping: margins for every correct point, runs on chosen survivors."""

from __future__ import annotations

import torch

from advtrain.attacks import FABT, PGD
from advtrain.evaluation.cascade import Cascade, Step, suite_attacks
from advtrain.evaluation.suite import _argmax
from advtrain.threat import ThreatModel

torch.set_num_threads(1)
EPS = 0.1


def _cascade(model, x, y, threat):
    pred = _argmax(model, x, 100)
    return Cascade(x, y, threat, lambda p: _argmax(model, p, 100), (pred == y).cpu(), pred.clone())


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


def test_standard_suite_runs_fab_t_over_three_targets_and_thorough_over_nine():
    threat = ThreatModel(norm="linf", eps=0.3)
    fab = {
        suite: next(s for s in suite_attacks(suite, threat, 10, 0) if s.name == "fab-t")
        for suite in ("standard", "thorough")
    }
    assert fab["standard"].min_norm and fab["standard"].attack.n_targets == 3
    assert fab["thorough"].attack.n_targets == 9
    assert not fab["standard"].attack.threat.bounded
    apgd_t = next(s for s in suite_attacks("standard", threat, 10, 0) if s.name == "apgd-t")
    assert apgd_t.attack.n_targets == 9
