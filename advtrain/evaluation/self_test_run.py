"""Running the binarization self-test (:mod:`.self_test`) with an evaluation's own attacks.

:func:`binarization_test` plants an adversarial example around each of a few test points
(:func:`.self_test.plan`), then attacks the binarized model with the steps given (by default the
suite's cascade for two classes, :func:`.steps.suite_attacks`) and the escalations that the
evaluation's checks called for (:func:`.escalation.escalate`, fed the same checks), so it tests
exactly the attacks the robust accuracy rests on. :func:`suite_self_test` is the evaluation's
stage: it picks the test points (seeded, classified correctly, ``2 * eps`` apart) and returns
the report's check.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..threat import ThreatModel
from .context import EvalContext, SuiteSettings, cascade_for
from .escalation import escalate
from .findings import Check
from .journal import Journal
from .points import TensorPoints
from .self_test import SelfTestResult, not_run, plan, result_of, spaced
from .steps import Step, suite_attacks

#: The scope of the self-test's work in the evaluation's journal, and its seeds' prefix.
SCOPE = "self-test"
#: Test points of the self-test by default.
SELF_TEST_POINTS = 32


def binarization_test(
    model: nn.Module,
    x: Tensor,
    threat: ThreatModel,
    *,
    steps: Sequence[Step] | None = None,
    found: Sequence[Check] = (),
    settings: SuiteSettings | None = None,
    points: int = SELF_TEST_POINTS,
    features: str | None = None,
    journal: Journal | None = None,
) -> SelfTestResult:
    """The binarization test of Zimmermann et al. (2022) on up to ``points`` of ``x`` (points
    the model classifies correctly, tried in the order given; those closer than ``2 * eps`` to
    one already taken are skipped).

    Args:
        model: the model (returning logits), in eval mode.
        x: candidate test points.
        threat: the threat model the attacks work in.
        steps: the attacks, run as a survivor cascade (default: ``settings.suite``'s cascade
            for two classes, seeded from ``settings.seed``).
        found: the evaluation's checks: the escalations they call for run too.
        settings: the evaluation's settings (suite, seed, batch size, EOT); default the
            standard suite with seed 0.
        points: most test points.
        features: the module name of the model's readout, whose input are the features
            (default: its last ``nn.Linear`` called).
        journal: the evaluation's journal, where the attacks' work is saved for a resume.

    Returns:
        Per test point, the step that found the planted adversarial example (or ``None``).
    """
    settings = settings or SuiteSettings()
    seed, started = settings.seed, time.perf_counter()
    device = x.device
    chosen = spaced(x, torch.arange(len(x)), threat, points)
    xs = x[chosen.to(device)]
    planned = plan(
        model,
        xs,
        threat,
        chosen,
        seed=seed,
        features_layer=features,
        batch_size=settings.batch_size,
    )
    if planned.model is None:
        return result_of(planned, [], [])
    kept = planned.points.to(device)
    tested = x[kept]
    ctx = EvalContext.build(
        planned.model.eval(),
        TensorPoints(tested),
        torch.zeros(len(tested), dtype=torch.int64, device=device),
        threat,
        settings,
        n_classes=2,
        device=str(device),
        started=started,
    )
    clean_pred = ctx.judge(tested).cpu()
    state = cascade_for(ctx, SCOPE, clean_pred)
    if journal is not None:
        state.journal = journal
    chain = (
        list(steps)
        if steps is not None
        else suite_attacks(settings.suite, threat, 2, seed, settings.batch_size)
    )
    for step in chain:
        state.run(step.seeded(seed, scope=f"{SCOPE}: "), ctx.attack_model)
    escalate(ctx, state, list(found))
    found_by = [None if by in (None, "clean") else by for by in state.broken_by]
    # a test point the binarized model does not call clean is a setup failure, not a pass
    misfit = [int(planned.points[i]) for i, by in enumerate(state.broken_by) if by == "clean"]
    if misfit:
        keep = [i for i, by in enumerate(state.broken_by) if by != "clean"]
        planned.setup_failed.extend(misfit)
        planned.points = planned.points[keep]
        found_by = [found_by[i] for i in keep]
    ran = list(dict.fromkeys(state.per_attack))
    return result_of(planned, found_by, ran)


def suite_self_test(
    ctx: EvalContext,
    correct: Tensor,
    found: Sequence[Check],
    points: int,
    features: str | None,
    required: bool,
) -> Check:
    """The evaluation's self-test on up to ``points`` correctly classified (and attackable)
    points drawn with the evaluation's seed; its check for the report. ``required`` (the caller
    asked for it): a model whose features cannot be read is an error; otherwise (the thorough
    suite's default) the check says why it did not run."""
    candidates = (correct & ctx.attackable).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(ctx.seed_for(SCOPE))
    order = candidates[torch.randperm(len(candidates), generator=generator)]
    # enough candidates for the spacing to skip a few, read at once (a chunk at most)
    order = order[: max(4 * points, 64)]
    x = ctx.x[order.to(ctx.x.device)]
    try:
        result = binarization_test(
            ctx.model,
            x,
            ctx.threat,
            found=found,
            settings=ctx.settings,
            points=points,
            features=features,
            journal=ctx.journal,
        )
    except AdvtrainError as error:
        if required:
            raise
        return not_run(str(error).removeprefix("self-test: "))
    # indices into the evaluation's points
    index = order.tolist()
    result = SelfTestResult(
        points=[index[p] for p in result.points],
        found_by=result.found_by,
        steps=result.steps,
        layer=result.layer,
        setup_failed=[index[p] for p in result.setup_failed],
        random_hits=[index[p] for p in result.random_hits],
    )
    return result.check()
