"""The gradient-masking checks of one evaluation, run on a seeded subset and journaled.

:func:`journaled_diagnostics` runs the checks of :mod:`.diagnostics` on up to
``diagnostics_points`` correctly classified points after the cascade, each attack seeded from its
check's name, and saves what they found in the evaluation's journal (:mod:`.journal`) so that a
resumed evaluation replays them instead of running them again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from ..attacks import EOT
from . import diagnostics as checks
from .cascade import Cascade
from .context import EvalContext, diagnostics_subset
from .findings import Check, CheckName
from .journal import Unit
from .shards import seeded
from .steps import Step
from .surrogate_check import surrogate_transfer


@dataclass
class CascadeRun:
    """What the cascade's run tells the checks: the points the first (iterative) attack broke,
    the points standing before Square, and how many of them Square broke."""

    first_broken: Tensor
    white_box_survivors: int = 0
    square_broke: int = 0
    ran_square: bool = False


def journaled_diagnostics(
    ctx: EvalContext, state: Cascade, correct: Tensor, first: Step, run: CascadeRun
) -> list[Check]:
    """The checks of :func:`_diagnostics`, saved in the journal (and replayed from it)."""
    journal, before = ctx.journal, (0, 0) if ctx.counter is None else ctx.counter.counts()
    unit = None if journal is None else journal.get("diagnostics")
    if unit is not None:
        if ctx.counter is not None:
            ctx.counter.points += int(unit.facts["forwards"][0])
            ctx.counter.calls += int(unit.facts["forwards"][1])
        return [Check(**check) for check in unit.facts["checks"]]
    with seeded(ctx.seed, ctx.x.device):
        found = _diagnostics(ctx, state, correct, first, run)
    if journal is not None:
        after = (0, 0) if ctx.counter is None else ctx.counter.counts()
        checks = [json.loads(json.dumps(asdict(c), default=_plain)) for c in found]
        facts = {"checks": checks, "forwards": [a - b for a, b in zip(after, before)]}
        journal.put("diagnostics", Unit(facts=facts))
        # the run goes on with the checks as they will be replayed, so both runs agree
        found = [Check(**check) for check in checks]
    return found


def _plain(value: Any) -> Any:
    """JSON for what a check's evidence may hold besides plain values."""
    if isinstance(value, Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _diagnostics(
    ctx: EvalContext, state: Cascade, correct: Tensor, first: Step, run: CascadeRun
) -> list[Check]:
    """The gradient-masking checks, on up to ``diagnostics_points`` correctly classified points,
    each attack seeded from its check's name."""
    subset = diagnostics_subset(correct & ctx.attackable, ctx.settings.diagnostics_points, ctx.seed)
    xs, ys = state.x[subset], state.y[subset]
    model, judge, threat = ctx.attack_model, ctx.judge, ctx.threat
    found = [
        checks.randomness(ctx.randomized, ctx.settings.eot_samples, ctx.settings.votes),
        checks.probability_outputs(ctx.probabilities),
    ]
    if not len(subset):
        return found
    masked, saturated = checks.gradients(ctx.model if ctx.randomized else model, xs, ys)
    found += [
        masked,
        saturated,
        checks.single_step(
            model,
            judge,
            threat,
            xs,
            ys,
            run.first_broken[subset],
            first.name,
            ctx.seed_for(CheckName.SINGLE_STEP),
        ),
        checks.unbounded(model, judge, threat, xs, ys, ctx.seed_for(CheckName.UNBOUNDED)),
        checks.eps_growth(model, judge, threat, xs, ys, ctx.seed_for(CheckName.EPS_GROWTH)),
    ]
    if run.ran_square:
        found.append(checks.black_box(run.white_box_survivors, run.square_broke))
    # the surrogate learns from single passes: EOT's average would cost eot_samples passes each
    asked = model.model if isinstance(model, EOT) and isinstance(model.model, nn.Module) else model
    found.append(
        surrogate_transfer(
            asked,
            judge,
            threat,
            xs,
            ys,
            state.standing[subset],
            ctx.seed_for(CheckName.TRANSFER),
        )
    )
    found.append(
        checks.incomplete(
            model,
            judge,
            threat,
            xs,
            ys,
            (~state.standing)[subset],
            ctx.seed_for(CheckName.LOSS_IMPROVING),
        )
    )
    return found
