"""``advtrain.evaluate``: a robustness number that holds against an adaptive attacker.

The order of work:

1. Look at the model (:class:`.context.EvalContext`): is it randomised (repeated passes
   disagree)? Does it return probabilities? A randomised model is attacked through
   :class:`~advtrain.attacks.EOT` over ``eot_samples`` passes and judged by a majority vote of
   ``votes`` passes; probabilities are attacked through their logarithm. The wrappers are built
   once, there, and serve every later stage.
2. Run the suite's cascade (:mod:`.cascade`, AutoAttack's recipe, Croce & Hein 2020) on the
   correctly classified points.
3. Run the gradient-masking diagnostics (:mod:`.diagnostics`, and transfer from a distilled
   surrogate, :mod:`.surrogate_check`) on a small subset (:mod:`.run_checks`). In the thorough
   suite every attack's forward calls are watched for silent successes of the subset's points
   (:mod:`.iterate_watch`): an adversarial point visited but not returned is recovered and named.
4. When a check fires, escalate on its own, by the table of rules of :mod:`.escalation`:
   straight-through gradients for step functions (BPDA without knowing the defence, Athalye et
   al. 2018), margin and DLR losses, more iterations and restarts, more queries for Square, and
   a label-only attack (HopSkipJump) when the gradients vanish. Each escalation is reported
   with the robust accuracy before and after.
   With ``self_test`` (the thorough suite's default), the binarization self-test
   (:mod:`.self_test`) checks that those same attacks find an adversarial example planted
   inside the eps-ball.
5. Measure: robust margins (minimum-norm attack), the accuracy-versus-eps curve and the
   adversarial radius, entropy, defensive margins, precision/recall/F1 clean and attacked.
6. With ``positive_class``: the positive class's recall, precision, PR-AUC and ROC-AUC clean
   and attacked (the attacked scores are those of each point's adversarial example, the clean
   ones where no attack broke it), and the recall at a false-positive rate ``fpr``, measured by
   attacking the thresholded classifier (:mod:`.operating_point`).

With two classes no step ascends the DLR losses, constant there (:data:`.steps.DLR_SKIPPED`);
the report's ``losses`` names the loss of every step run and what was skipped and why. With
``attack_classes`` only the points of those true classes are attacked (a fraud team attacks the
fraud rows); the others keep their clean prediction in every attacked figure. With feature
constraints in the threat model (``threat.constraints``), the report's ``feasibility`` counts
the adversarial points, the share satisfying every constraint (all of them: the cascade refuses
the others) and the refused outputs, and describes the constraint set.

Every attack is seeded from the base seed and its own name (:func:`.shards.step_seed`), and
attacked chunk by chunk (:mod:`.shards`), so a run repeats exactly, in one process or several.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..attacks.base import frozen, model_device
from ..attacks.counting import CountedModel
from ..errors import AdvtrainError
from ..threat import Norm, ThreatModel
from ..util import check_positive_int
from . import metrics
from .cascade import Cascade
from .context import EvalContext, SuiteSettings, cascade_for, check_classes
from .escalation import escalate
from .findings import VERDICT, Check, CheckName, Escalation
from .inputs import as_points, check_labels, logits_only, resume_journal
from .iterate_watch import silent_success
from .operating_point import FROM_ARGMAX, evaluate_operating_point
from .progress import terminal_progress
from .records import feasibility, per_sample_records
from .report import Report, model_card, robustness_score
from .run_checks import CascadeRun, journaled_diagnostics
from .sandwich import (
    Sandwich,
    add_certificates,
    certify_method,
    check_certifiable,
    check_sigma,
    sandwich,
    smoothing_figures,
    summary_of,
)
from .self_test import readout_layer
from .self_test_run import suite_self_test
from .steps import DLR_SKIPPED, Step, binary, gradient_step, margin_attack, suite_attacks

#: The name the robust-margin measurement after the escalations is seeded by.
MARGINS = "robust margins"


def evaluate(
    model: nn.Module,
    x: Tensor | Iterable[Any],
    y: Tensor | None = None,
    *,
    norm: str = "linf",
    eps: float = 0.3,
    suite: str = "standard",
    n_classes: int | None = None,
    lower: float | Tensor = 0.0,
    upper: float | Tensor = 1.0,
    mask: Tensor | None = None,
    threat: ThreatModel | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    batch_size: int = 1000,
    diagnostics_points: int = 100,
    eot_samples: int = 16,
    votes: int = 32,
    radius_threshold: float = 0.5,
    positive_class: int | None = None,
    examples: int = 8,
    attack_classes: Sequence[int] | None = None,
    fpr: float | None = 0.01,
    resume: str | Path | None = None,
    progress: bool | None = None,
    self_test: bool | None = None,
    self_test_points: int = 32,
    self_test_features: str | None = None,
    certify: bool | str = False,
    smoothing_sigma: float | None = None,
    smoothing_samples: int = 100_000,
) -> Report:
    """Evaluate ``model`` (returning logits) on ``x, y``, or on a dataset read a chunk at a time.

    ``x`` is a tensor (with labels ``y``), a map-style ``torch.utils.data.Dataset`` of ``(x, y)``
    items, a ``DataLoader`` over one (its ``dataset`` is read in index order, chunk by chunk: its
    sampler and batch size play no part, so the evaluation is repeatable and resumable), or
    :class:`advtrain.data.LazyInputs` (its ``labels`` are the labels). A dataset is never held
    whole in memory: each stage reads the rows it works on (:mod:`.points`), so the memory is
    bounded by ``batch_size`` points; the report equals the one of the same points as a tensor.
    Any other iterable of ``(x, y)`` batches is read whole first.

    Args:
        norm, eps, lower, upper, mask: the threat model (or pass ``threat``).
        suite: ``"quick"``, ``"standard"`` (AutoAttack's recipe, default) or ``"thorough"``.
        n_classes: number of classes (default: the width of the model's output).
        device: where to run (default: the model's device); the model is moved there.
        seed: the base seed: every attack's seed is derived from it and the attack's name, and
            torch's global generator is seeded with it (for randomised models), so a run can be
            repeated exactly.
        batch_size: most points per forward pass, and the size of the chunks the points are
            attacked in (:mod:`.shards`): under ``torch.distributed`` each rank attacks its share
            of the chunks and every rank returns the merged report, equal to one process's.
        diagnostics_points: size of the subset the masking checks run on.
        eot_samples, votes: passes per gradient and per judgement for a randomised model.
        radius_threshold: the adversarial radius is the largest eps where accuracy stays at or
            above this fraction of the clean accuracy.
        positive_class: for binary/imbalanced data, the class whose figures matter: its recall,
            precision, PR-AUC and ROC-AUC clean and attacked, and its recall at ``fpr``.
        examples: adversarial examples kept for the report's pictures.
        attack_classes: attack only the points whose true label is one of these classes (a fraud
            team attacks the fraud rows, pushed towards "legitimate"); the others keep their
            clean prediction in every attacked figure. Default: every point.
        fpr: with ``positive_class``, the false-positive rate of the operating point (default
            0.01): the threshold is set on the clean negatives' positive-class scores so that at
            most this share of them is flagged, and the recall of the positives there is
            reported clean and attacked, the attack run against the thresholded classifier
            (:mod:`.operating_point`). None: no operating point.
        resume: a directory for the evaluation's state (:mod:`.journal`): every attack's work on
            every chunk is saved there as it ends, and an evaluation of the same model, points
            and settings given the same directory replays what was saved and goes on, ending
            with the same report, bit for bit, as an uninterrupted run (wall-clock times aside).
            Other settings than the saved ones are an error that names them.
        progress: a progress bar (attack, chunk, points standing) on the terminal; default:
            when standard error is a terminal.
        self_test: run the binarization self-test of Zimmermann et al. (2022)
            (:mod:`.self_test`): around ``self_test_points`` correctly classified points an
            adversarial example is planted inside the eps-ball by replacing the model's readout
            with a binary one, and the suite's own attacks and escalations must find it; a pass
            rate under 0.95 is a verdict and makes the robust accuracy unreliable. Default: with
            the thorough suite (where a model whose features cannot be read gets a "not run"
            line instead of an error).
        self_test_points: most test points of the self-test (default 32).
        self_test_features: the module name of the model's readout layer (its input are the
            features): default, the last ``nn.Linear`` the model calls.
        certify: verify every point by bound propagation (:mod:`advtrain.certify`: ``True`` or
            ``"crown"``, ``"crown-ibp"``, ``"ibp"``) and report the sandwich (:mod:`.sandwich`):
            verified accuracy (a proven lower bound) <= robust accuracy under the attacks (an
            upper bound), the gap, and per point which side decided it. A point verified and
            broken is an error naming it. A model or threat bound propagation does not support
            is a one-line error before any work.
        smoothing_sigma: also certify the smoothed model built on this one at this Gaussian
            noise level (Cohen et al. 2019; sigma in input units), reported beside the sandwich
            as the smoothed model's: n0 = 100, ``smoothing_samples`` (default 100,000, the
            paper's) estimation samples per point, alpha = 0.001.

    Raises:
        AdvtrainError: bad settings, or inputs that do not fit: a model whose output is not
            logits (a tuple, dict or object output goes through
            :func:`advtrain.models.logits_model` first), labels outside ``0..n_classes-1``,
            NaN inputs or inputs outside the bounds (0-255 pixels against [0, 1] bounds).
    """
    start = time.perf_counter()
    if fpr is not None and not (isinstance(fpr, (int, float)) and 0 < fpr < 1):
        raise AdvtrainError(f"fpr must be a false-positive rate between 0 and 1, got {fpr!r}")
    if threat is None:
        # ThreatModel checks the norm's name and reports a misspelt one
        threat = ThreatModel(norm=cast(Norm, norm), eps=eps, lower=lower, upper=upper, mask=mask)
    if not threat.bounded:
        raise AdvtrainError("evaluate needs a finite eps")
    if not isinstance(model, nn.Module):
        raise AdvtrainError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if device is not None:
        model = model.to(device)
    device = model_device(model, default=torch.device("cpu"))
    points, y = as_points(x, y, threat, device)
    model = logits_only(model, points, seed)
    settings = SuiteSettings(
        suite=suite,
        seed=seed,
        batch_size=batch_size,
        diagnostics_points=diagnostics_points,
        eot_samples=eot_samples,
        votes=votes,
        radius_threshold=radius_threshold,
        positive_class=positive_class,
        examples=examples,
        fpr=None if fpr is None else float(fpr),
        self_test=self_test,
        self_test_points=check_positive_int("self_test_points", self_test_points),
        self_test_features=self_test_features,
        certify=certify_method(certify),
        smoothing_sigma=None if smoothing_sigma is None else check_sigma(smoothing_sigma),
        smoothing_samples=check_positive_int("smoothing_samples", smoothing_samples),
    )
    if settings.certify is not None:  # an unsupported layer fails before any attack
        check_certifiable(model, threat)
    with frozen(model), terminal_progress(progress) as bar:
        counted = CountedModel(model).eval()
        ctx = EvalContext.build(
            counted,
            points,
            y,
            threat,
            settings,
            n_classes=n_classes,
            device=str(device),
            started=start,
        )
        check_labels(y, ctx.n_classes)
        if positive_class is not None:
            check_classes("positive_class", [positive_class], ctx.n_classes)
        if attack_classes is not None:
            checked = check_classes("attack_classes", attack_classes, ctx.n_classes)
            ctx = replace(ctx, settings=replace(settings, attack_classes=checked))
        if self_test:  # asked for: a model whose features cannot be read fails before any work
            readout_layer(ctx.model, points[:1], self_test_features)
        journal = None if resume is None else resume_journal(resume, ctx, model)
        ctx = replace(
            ctx,
            journal=journal,
            progress=bar if ctx.shards.rank == 0 else None,
            counter=counted,
        )
        return _evaluate(ctx)


def _evaluate(ctx: EvalContext) -> Report:
    """The cascade, the checks, the escalations they call for, and the margins: the report."""
    stages: dict[str, float] = {}
    mark = time.perf_counter()
    clean_pred = ctx.shards.map(ctx.judge, ctx.x, ctx.seed)
    correct = clean_pred == ctx.y.cpu()
    stages["clean predictions"] = time.perf_counter() - mark
    state = cascade_for(ctx, "cascade", clean_pred)
    steps = suite_attacks(ctx.settings.suite, ctx.threat, ctx.n_classes, ctx.seed, ctx.batch_size)
    naive = _naive(ctx, clean_pred) if ctx.repaired_outputs else None
    run = _cascade(state, steps, ctx.attack_model, correct)
    escalations = []
    if naive is not None:
        reason = CheckName.RANDOMNESS if ctx.randomized else CheckName.PROBABILITIES
        action = (
            "EOT gradients and majority-vote judgement"
            if ctx.randomized
            else "attack through log(p)"
        )
        escalations.append(
            Escalation(
                reason.value,
                f"{action}: the whole cascade",
                naive.robust_accuracy,
                state.robust_accuracy,
            )
        )

    # diagnostics on a subset of the correctly classified points (rank 0 runs them)
    mark = time.perf_counter()
    found: list[Check] = []
    if ctx.shards.rank == 0:
        found = journaled_diagnostics(ctx, state, correct, steps[0], run)
    found = ctx.shards.from_rank_zero(found)
    stages["diagnostics"] = time.perf_counter() - mark
    escalations += escalate(ctx, state, found)
    # the attacks' iterates were watched in the thorough suite (not a randomised model's)
    found.append(
        silent_success(
            state.silent,
            watched=ctx.watches_iterates,
            why_not=None
            if ctx.randomized
            else "not checked in this suite: the thorough suite watches every attack's iterates "
            "on the diagnostics subset",
        )
    )
    if ctx.settings.runs_self_test:
        mark = time.perf_counter()
        found.append(
            suite_self_test(
                ctx,
                correct,
                found,
                ctx.settings.self_test_points,
                ctx.settings.self_test_features,
                required=bool(ctx.settings.self_test),
            )
        )
        stages["self-test"] = time.perf_counter() - mark
    certified = smoothing = None
    if ctx.settings.certify is not None:
        mark = time.perf_counter()
        certified = sandwich(ctx, state, correct, ctx.settings.certify)
        stages["certification"] = time.perf_counter() - mark
    if ctx.settings.smoothing_sigma is not None:
        mark = time.perf_counter()
        smoothing = smoothing_figures(
            ctx, ctx.settings.smoothing_sigma, ctx.settings.smoothing_samples
        )
        stages["randomized smoothing"] = time.perf_counter() - mark

    # robust margins of the points no minimum-norm attack has measured yet
    if ctx.threat.norm in ("linf", "l2"):
        margins = margin_attack(ctx.threat, ctx.n_classes, ctx.seed_for(MARGINS), ctx.batch_size)
        state.measure(margins, ctx.attack_model, MARGINS)
    if naive is not None:
        stages["naive cascade"] = sum(naive.seconds.values())
    stages.update(state.seconds)
    return _report(
        ctx, state, correct, clean_pred, found, escalations, stages, certified, smoothing
    )


@dataclass
class Positive:
    """The positive class's figures (``Report.positive_metrics``) and the cascade run at its
    operating point (None when none ran)."""

    figures: dict[str, Any]
    operating: Cascade | None


def _positive(
    ctx: EvalContext, state: Cascade, clean_pred: Tensor, clean: Tensor, adversarial: Tensor
) -> Positive:
    """Recall, precision, PR-AUC and ROC-AUC of the positive class, clean and attacked (logits
    ``clean`` and ``adversarial``: the latter at each point's worst case, clean where nothing
    broke it), and the recall at the operating point of false-positive rate ``fpr``."""
    positive, fpr = ctx.settings.positive_class, ctx.settings.fpr
    assert positive is not None
    yc = ctx.y.cpu()
    clean_scores = metrics.positive_score(clean, positive)
    figures: dict[str, Any] = {
        "positive_class": positive,
        "score": "z_p - max_{c != p} z_c (two classes: the log-odds of the positive class)",
        "clean": metrics.positive_class_metrics(yc, clean_pred, clean_scores, positive),
        "attacked": metrics.positive_class_metrics(
            yc, state.adv_pred.cpu(), metrics.positive_score(adversarial, positive), positive
        ),
    }
    operating = None
    if fpr is not None:
        figures["at_fpr"], operating = evaluate_operating_point(
            ctx, state, clean_scores, positive, fpr
        )
    return Positive(figures, operating)


def _losses(ctx: EvalContext, cascades: Sequence[Cascade]) -> dict[str, Any]:
    """The loss of every step run (argmax cascade, escalations, operating point), and the
    losses skipped with the reason."""
    per_step: dict[str, str] = {}
    for cascade in cascades:
        per_step.update(cascade.losses)
    return {
        "per_step": per_step,
        "used": sorted(set(per_step.values())),
        "skipped": {"dlr": DLR_SKIPPED} if binary(ctx.n_classes) else {},
    }


def _naive(ctx: EvalContext, clean_pred: Tensor) -> Cascade:
    """What a naive evaluation would have said of a model that needed wrapping: the cascade's
    first attack on the model as it is, judged by its own argmax."""
    naive = replace(cascade_for(ctx, "naive", clean_pred), judge=ctx.argmax, watch_iterates=False)
    naive.run(gradient_step(ctx.threat, batch_size=ctx.batch_size).seeded(ctx.seed), ctx.model)
    return naive


def _cascade(
    state: Cascade, steps: list[Step], attack_model: nn.Module, correct: Tensor
) -> CascadeRun:
    """Run ``steps`` in order on the standing points; note what the checks need."""
    run = CascadeRun(first_broken=torch.zeros(len(state.x), dtype=torch.bool))
    for step in steps:
        square = step.name == "square"
        if square:
            run.white_box_survivors = len(state.indices())
            run.ran_square = True
        broken_before = ~state.standing & correct
        broke = state.run(step, attack_model)
        if square:
            run.square_broke = broke
        if step is steps[0]:
            run.first_broken = ~state.standing & correct & ~broken_before
    return run


def _report(
    ctx: EvalContext,
    state: Cascade,
    correct: Tensor,
    clean_pred: Tensor,
    found: list[Check],
    escalations: list[Escalation],
    stages: dict[str, float],
    certified: Sandwich | None = None,
    smoothing: dict[str, Any] | None = None,
) -> Report:
    threat, settings, x = ctx.threat, ctx.settings, ctx.x
    mark = time.perf_counter()
    clean_acc = float(correct.float().mean()) if len(x) else float("nan")
    robust_acc = state.robust_accuracy
    logits_clean = state.shards.map(ctx.logits, x, ctx.seed)
    logits_adv = _adversarial_logits(state, logits_clean)
    yc = ctx.y.cpu()
    margins = state.margin
    grid = metrics.eps_grid(threat.eps, margins[correct])
    broken_at_eps = correct & ~state.standing
    curve = metrics.accuracy_vs_eps(margins, correct, grid, [(threat.eps, broken_at_eps)])
    pred_clean, pred_adv = clean_pred.cpu(), state.adv_pred.cpu()
    classification = {
        "clean": metrics.classification_metrics(yc, pred_clean, ctx.n_classes),
        "adversarial": metrics.classification_metrics(yc, pred_adv, ctx.n_classes),
    }
    ran_min_norm = threat.norm in ("linf", "l2")
    attackable = ctx.attackable
    per_sample = per_sample_records(
        state,
        yc,
        pred_clean,
        pred_adv,
        margins if ran_min_norm else None,
        None if settings.attack_classes is None else attackable,
    )
    positive = (
        None
        if settings.positive_class is None
        else _positive(ctx, state, pred_clean, logits_clean, logits_adv)
    )
    cascades = (
        [state]
        if positive is None or positive.operating is None
        else [
            state,
            positive.operating,
        ]
    )
    shown = _example_rows(state, correct, settings.examples)
    add_certificates(per_sample, certified, smoothing)
    stages["report"] = time.perf_counter() - mark
    # every rank's passes (each also probes the model: a few more than one process spends)
    forwards = sum(ctx.shards.all_gather(0 if ctx.counter is None else ctx.counter.points))
    return Report(
        clean_accuracy=clean_acc,
        robust_accuracy=robust_acc,
        per_attack=dict(state.per_attack),
        robustness_score=robustness_score(clean_acc, robust_acc),
        diagnostics=found,
        escalations=escalations,
        robust_margin=metrics.margin_summary(margins, correct & attackable) if ran_min_norm else {},
        accuracy_vs_eps=curve if ran_min_norm else [(threat.eps, robust_acc)],
        adversarial_radius=metrics.adversarial_radius(curve, clean_acc, settings.radius_threshold)
        if ran_min_norm
        else None,
        radius_threshold=settings.radius_threshold,
        entropy={
            "clean": float(metrics.entropy(logits_clean).mean()),
            "adversarial": float(metrics.entropy(logits_adv).mean()),
        },
        defensive_margin=metrics.defensive_margins(logits_clean, logits_adv, yc),
        classification=classification,
        positive_class=settings.positive_class,
        per_sample=per_sample,
        settings={
            "norm": threat.norm,
            "eps": threat.eps,
            "suite": settings.suite,
            "n": len(x),
            "n_classes": ctx.n_classes,
            "seed": settings.seed,
            "device": ctx.device,
            "randomized": ctx.randomized,
            "randomness_per_call": ctx.per_call,
            "probabilities": ctx.probabilities,
            "processes": state.shards.world,
            "batch_size": settings.batch_size,
            "forward_passes": forwards,
            "gives_up": sorted(set().union(*(c.gives_up for c in cascades))),
            "seconds": time.perf_counter() - ctx.started,
            "seconds_by_stage": stages,
        },
        examples={
            "x": state.x[shown].cpu(),
            "x_adv": state.x_adv[shown].cpu(),
            "y": yc[shown],
            "clean_pred": pred_clean[shown],
            "adv_pred": pred_adv[shown],
        },
        losses=_losses(ctx, cascades),
        attack_classes=None if settings.attack_classes is None else list(settings.attack_classes),
        positive_metrics=None if positive is None else positive.figures,
        feasibility=feasibility(ctx.threat, cascades, borrowed=FROM_ARGMAX),
        model_card=model_card(
            clean_acc,
            robust_acc,
            threat,
            passes_per_prediction=settings.votes if ctx.randomized else 1,
            forward_passes=forwards,
            unreliable=any(c.triggered and c.severity == VERDICT for c in found),
            verified_accuracy=None if certified is None else certified.verified_accuracy,
        ),
        certified=None if certified is None else certified.to_dict(),
        smoothing=None if smoothing is None else summary_of(smoothing),
    )


def _adversarial_logits(state: Cascade, clean: Tensor) -> Tensor:
    """Each point's logits at its worst case: those kept as it broke, else the clean ones."""
    if state.adv_logits is None:
        return clean
    broken = torch.tensor([by not in (None, "clean") for by in state.broken_by], dtype=torch.bool)
    return torch.where(broken.unsqueeze(1), state.adv_logits, clean)


# ---------------------------------------------------------------------- helpers
def _example_rows(state: Cascade, correct: Tensor, count: int) -> Tensor:
    """Indices of examples for the report's grid: broken points first, then survivors."""
    broken = (correct & ~state.standing).nonzero().squeeze(1)
    rest = state.standing.nonzero().squeeze(1)
    return torch.cat([broken, rest])[:count]
