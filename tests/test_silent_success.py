"""Silent success (Pintor et al., NeurIPS 2022): an attack that visits an adversarial iterate and
drops it is caught by the iterate watch, its points recovered; honest attacks and points outside
the threat model are never counted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from advtrain.attacks import APGD, PGD, Attack
from advtrain.attacks.base import Outcome
from advtrain.device_sync import compact_every
from advtrain.evaluation import iterate_watch
from advtrain.evaluation.cascade import Cascade
from advtrain.evaluation.context import argmax
from advtrain.evaluation.findings import WARNING, CheckName
from advtrain.evaluation.iterate_watch import IterateWatch, silent_success
from advtrain.evaluation.journal import Journal
from advtrain.evaluation.shards import Shards
from advtrain.evaluation.steps import Step
from advtrain.threat import ThreatModel, lp_norm

from .test_host_syncs import SyncCounter

torch.set_num_threads(1)
EPS = 0.1


class VisitsAndDrops(Attack):
    """Runs PGD (last iterate, no early stop), then returns the clean points: a silent success
    wherever one of PGD's iterates was adversarial."""

    def run(self, model, x, y, target, generator):
        PGD(self.threat, steps=10, early_stop=False, seed=0)(model, x, y)
        return Outcome(x.clone(), torch.zeros(len(x), dtype=torch.bool), torch.zeros(len(x)))


class QueriesOutside(Attack):
    """Queries the model at an FGSM step of 2.5 eps (outside the ball), returns the clean points."""

    def __init__(self, threat: ThreatModel) -> None:
        super().__init__(threat)
        self.fooled = 0

    def run(self, model, x, y, target, generator):
        with torch.enable_grad():
            point = x.clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(model(point), y)
            (grad,) = torch.autograd.grad(loss, point)
        far = (x + 2.5 * self.threat.eps * grad.sign()).clamp(0, 1)
        with torch.no_grad():
            self.fooled += int((model(far).argmax(1) != y).sum())
        assert not bool(self.threat.contains(far, x).any())
        return Outcome(x.clone(), torch.zeros(len(x), dtype=torch.bool), torch.zeros(len(x)))


def _cascade(model, x, y, threat, **options) -> Cascade:
    pred = argmax(model, x, 100)
    judge = lambda p: argmax(model, p, 100)  # noqa: E731
    return Cascade(x, y, threat, judge, (pred == y).cpu(), pred.clone(), **options)


def test_an_attack_that_drops_its_adversarial_iterate_is_caught(digits, digits_model):
    x, y = digits.test.x[:40], digits.test.y[:40]
    threat = ThreatModel(eps=EPS)
    found = {}
    for every in (1, 20):  # the CPU's exact path, and the accelerator's sync-free one
        with compact_every(every):
            state = _cascade(digits_model, x, y, threat)
            broke = state.run(Step("drops", VisitsAndDrops(threat)), digits_model)
        silent = state.silent["drops"]
        assert broke == len(silent) > 5 and sorted(silent) == silent
        assert all(state.broken_by[i] == "drops" for i in silent)
        assert not bool(state.standing[silent].any())
        kept = state.x_adv[silent]
        assert bool(threat.contains(kept, x[silent]).all())
        assert bool((digits_model(kept).argmax(1) != y[silent]).all())
        assert torch.equal(state.norm[silent], lp_norm(kept - x[silent], "linf"))
        found[every] = (silent, kept)
    assert found[1][0] == found[20][0] and torch.equal(found[1][1], found[20][1])
    check = silent_success(state.silent)
    assert check.triggered and check.severity == WARNING
    assert check.name == CheckName.SILENT_SUCCESS.value
    assert "drops" in check.detail and str(silent[0]) in check.detail
    assert check.evidence["per_step"]["drops"] == {"points": len(silent), "indices": silent}


def test_an_honest_attack_has_no_silent_success(digits, digits_model):
    x, y = digits.test.x[:40], digits.test.y[:40]
    state = _cascade(digits_model, x, y, ThreatModel(eps=EPS))
    assert state.run(Step("apgd-ce", APGD(state.threat, steps=20, seed=0)), digits_model) > 0
    assert state.silent == {}
    check = silent_success(state.silent)
    assert not check.triggered and check.evidence["points"] == 0
    assert not silent_success({}, watched=False).triggered


def test_a_point_queried_outside_the_threat_model_is_never_counted(digits, digits_model):
    x, y = digits.test.x[:40], digits.test.y[:40]
    state = _cascade(digits_model, x, y, ThreatModel(eps=EPS))
    standing = state.standing.clone()
    attack = QueriesOutside(state.threat)
    assert state.run(Step("outside", attack), digits_model) == 0
    assert attack.fooled > 0  # the queries outside were adversarial
    assert state.silent == {} and torch.equal(state.standing, standing)


def _anchors(norm: str) -> tuple[nn.Module, Tensor, Tensor, ThreatModel]:
    """12 random points of (3, 8, 8), labelled so that every point is misclassified: any row the
    watch matches is adversarial, so what it finds is what it matched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
    x = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = (model(x).argmax(1) + 1) % 4
    eps = {"linf": 0.1, "l2": 0.5, "l1": 3.0}[norm]
    return model, x, y, ThreatModel(norm=norm, eps=eps)


@pytest.mark.parametrize("buffer", [1, iterate_watch.BUFFER])  # matched per call, or together
@pytest.mark.parametrize("every", [1, 20])
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_rows_are_matched_by_value_on_a_shuffled_subset(norm, every, buffer, monkeypatch):
    monkeypatch.setattr(iterate_watch, "BUFFER", buffer)
    model, x, y, threat = _anchors(norm)
    generator = torch.Generator().manual_seed(2)
    order = torch.randperm(12, generator=generator)[:8]  # anchors 4 never appear
    inside = threat.project(x[order] + 0.3 * torch.randn(8, 3, 8, 8, generator=generator), x[order])
    # just outside: 5% beyond the ball's edge, towards the box's middle (never clipped)
    width = {"linf": 1.0, "l2": 192**0.5, "l1": 192.0}[norm]
    outside = x[order] + 1.05 * threat.eps / width * (0.5 - x[order]).sign()
    assert not bool(threat.contains(outside, x[order]).any())
    watch = IterateWatch(model, x, y, threat)
    with compact_every(every):
        watch(outside[:5])
        watch(inside[:3])
        with watch.hooked():
            model(torch.cat([outside[5:], inside[3:], inside[:2] + 0]))
    positions, rows = watch.broken()
    assert positions.tolist() == sorted(order.tolist())
    first = {int(a): i for i, a in reversed(list(enumerate(order.tolist())))}
    assert torch.equal(rows, inside[[first[int(p)] for p in positions]])
    assert watch.overflow == 0 and watch.watched == 3


def test_a_row_inside_two_balls_counts_for_both_and_overflow_is_counted():
    model, x, y, threat = _anchors("linf")
    x[1], y[1] = x[0], y[0]  # a duplicate point
    row = (x[:1] + 0.05).clamp(0, 1)
    for every, candidates, overflow in ((1, 1, 0), (20, 4, 0), (20, 1, 1)):
        watch = IterateWatch(model, x, y, threat, candidates=candidates)
        with compact_every(every):
            watch(row)
        assert len(watch.broken()[0]) == 2 - overflow
        assert watch.overflow == overflow


def test_outputs_it_cannot_judge_are_not_watched():
    _, x, y, threat = _anchors("linf")
    watch = IterateWatch(nn.Flatten(), x, y, threat)  # (N, 192) "logits" of another shape: fine
    watch(x[:2].reshape(2, 3, 64))  # inputs of another shape
    assert watch.unwatched == 1 and watch.broken()[0].numel() == 0
    images = IterateWatch(nn.Identity(), x, y, threat)
    images(x[:2])  # a 4-D output
    assert images.unwatched == 1 and images.watched == 0


def test_the_watch_adds_no_read_back_on_the_accelerator_schedule(monkeypatch):
    monkeypatch.setattr(iterate_watch, "BUFFER", 1)  # every call matched at once
    model, x, y, threat = _anchors("linf")
    y = model(x).argmax(1)
    attack = lambda steps: APGD(threat.replace(eps=1e-4), steps=steps, seed=0)  # noqa: E731

    def syncs(steps: int, watched: bool) -> int:
        watch = IterateWatch(model, x, y, threat)
        with compact_every(20), SyncCounter() as counter:
            if watched:
                with watch.hooked():
                    attack(steps)(model, x, y)
            else:
                attack(steps)(model, x, y)
        return counter.count

    assert syncs(80, True) - syncs(40, True) == syncs(80, False) - syncs(40, False)


@dataclass(frozen=True)
class _Rank(Shards):
    """One rank of two whose exchange is played back: rank 1 keeps what it sent, rank 0 gets it."""

    sent: list = None  # type: ignore[assignment]

    def all_gather(self, item):
        self.sent.append(item)
        return [item] if self.rank == 1 else [item, _SENT.pop(0)]


_SENT: list = []


def test_resume_and_the_exchange_between_ranks_keep_silent_successes(
    digits, digits_model, tmp_path: Path
):
    x, y = digits.test.x[:40], digits.test.y[:40]
    threat = ThreatModel(eps=EPS)
    step = Step("drops", VisitsAndDrops(threat))
    one = _cascade(digits_model, x, y, threat, shards=Shards(40, 20))
    one.run(step, digits_model)
    assert len({i < 20 for i in one.silent["drops"]}) == 2  # silent points in both chunks
    # a resumed run replays the silent successes with the rest of the unit
    saving = Journal(tmp_path, {"settings": 1})
    _cascade(digits_model, x, y, threat, shards=Shards(40, 20), journal=saving).run(
        step, digits_model
    )
    journal = Journal(tmp_path, {"settings": 1})
    again = _cascade(digits_model, x, y, threat, shards=Shards(40, 20), journal=journal)
    again.run(step, digits_model)
    assert journal.replayed == 2 and again.silent == one.silent
    # two ranks: rank 0 takes rank 1's silent successes in the exchange
    _SENT.clear()
    for rank in (1, 0):
        shards = _Rank(40, 20, rank, 2, [])
        state = _cascade(digits_model, x, y, threat, shards=shards)
        state.run(step, digits_model)
        if rank == 1:
            _SENT.extend(shards.sent)
    assert state.silent == one.silent and torch.equal(state.standing, one.standing)
