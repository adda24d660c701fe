"""The accelerator path of the attack loops: nothing read back to the host between compactions.

On a GPU every read-back (``bool(t)``, ``.item()``, ``nonzero``, a boolean-mask index) makes the
host wait for the device. The loops of APGD, PGD with early stopping and Square drop their broken
points only every few steps there (:func:`~advtrain.device_sync.compaction_interval`); on the
CPU they drop them at every step. ``compact_every`` forces the accelerator schedule on the CPU,
and a torch-function mode counts the calls that would synchronise.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from advtrain.attacks import APGD, APGDT, FABT, PGD, CarliniWagnerL2, Square
from advtrain.device_sync import compact_every

SYNCING = {
    Tensor.__bool__,
    Tensor.item,
    Tensor.tolist,
    Tensor.nonzero,
    torch.nonzero,
    Tensor.__int__,
    Tensor.__float__,
    Tensor.__index__,
    torch.masked_select,
    Tensor.masked_select,
}
INDEXING = {Tensor.__getitem__, Tensor.__setitem__}


class SyncCounter(TorchFunctionMode):
    """Counts the calls that read a value back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCING or (func in INDEXING and _boolean_index(args[1])):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _boolean_index(index: object) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, Tensor) and p.dtype == torch.bool for p in parts)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))


def _syncs(attack, model, x, y, every: int) -> int:
    with compact_every(every), SyncCounter() as counter:
        attack(model, x, y)
    return counter.count


# the budgets differ by 40 iterations; eps so small that every point stands throughout
ATTACKS = {
    "apgd-ce": lambda budget: APGD(eps=1e-4, steps=budget, seed=0),
    "apgd-t": lambda budget: APGDT(eps=1e-4, steps=budget, n_targets=2, seed=0),
    "pgd-early-stop": lambda budget: PGD(eps=1e-4, steps=budget, early_stop=True, seed=0),
    "pgd-l1": lambda budget: PGD(norm="l1", eps=1e-4, steps=budget, early_stop=True, seed=0),
    "square-linf": lambda budget: Square(eps=1e-4, n_queries=budget, seed=0),
    "square-l2": lambda budget: Square(norm="l2", eps=1e-4, n_queries=budget, seed=0),
    # minimum-norm attacks, unbounded (FAB-T over 2 targets: its loop runs twice)
    "fab-t": lambda budget: FABT(n_targets=2, steps=budget, seed=0),
    # CW's early-abort check reads back every steps / 10 steps, by design
    "cw-l2": lambda budget: CarliniWagnerL2(binary_search_steps=1, steps=budget, abort_early=False),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_loops_read_back_only_when_they_compact(name):
    model = _model()
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    short, long = ATTACKS[name](40), ATTACKS[name](80)
    # every step on the CPU: at least one read-back per iteration
    assert _syncs(long, model, x, y, 1) - _syncs(short, model, x, y, 1) >= 40
    # every 20 steps (the accelerator path): the 40 extra iterations add 2 compactions of a few
    # read-backs each (targets of APGD-T twice over)
    extra = _syncs(long, model, x, y, 20) - _syncs(short, model, x, y, 20)
    assert extra <= 2 * 2 * 4, extra


@pytest.mark.parametrize("name", list(ATTACKS))
def test_accelerator_path_breaks_the_same_points(digits_model, digits, name):
    """Dropping broken points later changes nothing for the standing ones (Square draws its
    random numbers for more rows, so its successes may differ; it must stay as strong)."""
    x, y = digits.test.x[:60], digits.test.y[:60]
    attack = {
        "apgd-ce": APGD(eps=0.1, seed=0),
        "apgd-t": APGDT(eps=0.1, n_targets=3, seed=0),
        "pgd-early-stop": PGD(eps=0.1, steps=20, early_stop=True, seed=0),
        "pgd-l1": PGD(norm="l1", eps=3.0, steps=20, early_stop=True, seed=0),
        "square-linf": Square(eps=0.1, n_queries=300, seed=0),
        "square-l2": Square(norm="l2", eps=0.6, n_queries=300, seed=0),
        "fab-t": FABT(eps=0.1, n_targets=3, steps=30, seed=0),
        "cw-l2": CarliniWagnerL2(eps=0.6, binary_search_steps=2, steps=50),
    }[name]
    results = {}
    for every in (1, 20):
        with compact_every(every):
            x_adv = attack(digits_model, x, y)
        assert bool(attack.threat.contains(x_adv, x).all())
        results[every] = digits_model(x_adv).argmax(1) != y
    if name.startswith("square"):
        assert abs(int(results[20].sum()) - int(results[1].sum())) <= 3
    else:
        assert torch.equal(results[20], results[1])


def test_standard_evaluation_on_the_accelerator_schedule(digits_model, digits):
    """The whole standard cascade (APGD-CE, APGD-T, FAB-T, Square, diagnostics, margins) with the
    accelerator schedule forced: it runs, stays in the threat model, and finds what the CPU
    schedule finds (Square's random draws differ, so within a point or two)."""
    import advtrain

    x, y = digits.test.x[:24], digits.test.y[:24]
    reports = {}
    for every in (1, 20):
        with compact_every(every):
            reports[every] = advtrain.evaluate(
                digits_model, x, y, eps=0.05, seed=0, diagnostics_points=20
            )
    cpu, accelerator = reports[1], reports[20]
    assert accelerator.clean_accuracy == cpu.clean_accuracy
    assert 0 < cpu.robust_accuracy < cpu.clean_accuracy  # survivors: every attack had work
    assert abs(accelerator.robust_accuracy - cpu.robust_accuracy) <= 2 / len(x)
    assert accelerator.robust_margin["median"] == pytest.approx(
        cpu.robust_margin["median"], rel=1e-4
    )
