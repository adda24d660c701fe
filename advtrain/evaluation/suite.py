"""``advtrain.evaluate``: a robustness number that holds against an adaptive attacker.

The order of work:

1. Look at the model: is it randomised (repeated passes disagree)? Does it return probabilities?
   A randomised model is attacked through :class:`~advtrain.attacks.EOT` and judged by a
   majority vote; probabilities are attacked through their logarithm.
2. Run the suite's cascade (:mod:`.cascade`) on the correctly classified points.
3. Run the gradient-masking diagnostics (:mod:`.diagnostics`) on a small subset.
4. When a check fires, escalate on its own: straight-through gradients for step functions
   (BPDA without knowing the defence), margin and DLR losses, more iterations and restarts, more
   queries for Square, and a label-only attack (HopSkipJump) when the gradients vanish. Each
   escalation is reported with the robust accuracy before and after.
5. Measure: robust margins (minimum-norm attack), the accuracy-versus-eps curve and the
   adversarial radius, entropy, defensive margins, precision/recall/F1 clean and attacked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks import APGDT, EOT, PGD, HopSkipJump, Square
from ..attacks.adaptive import (
    LogProbabilities,
    StraightThrough,
    is_randomized,
    looks_like_probabilities,
    majority_vote,
)
from ..attacks.base import frozen, model_device
from ..errors import AdvtrainError
from ..threat import ThreatModel
from . import diagnostics as checks
from . import metrics
from .cascade import Cascade, Step, gradient_step, margin_attack, suite_attacks
from .report import VERDICT, Check, Escalation, Report, robustness_score
from .shards import Shards, seeded

#: A warning-level black-box check reruns Square on this share of the survivors (at least
#: SECOND_SQUARE_LEAST of them), those closest to the boundary by their minimum-norm margin.
SECOND_SQUARE_SHARE, SECOND_SQUARE_LEAST = 0.25, 50
#: Checks whose firing calls for straight-through gradients and a stronger black-box attack.
MASKING_CHECKS = (
    "zero or NaN gradients",
    "single step stronger than iterative",
    "unbounded attack fails",
    "success does not grow with eps",
    "black-box stronger than white-box",
)


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
) -> Report:
    """Evaluate ``model`` (returning logits) on ``x, y`` or on a DataLoader of ``(x, y)`` batches.

    Args:
        norm, eps, lower, upper, mask: the threat model (or pass ``threat``).
        suite: ``"quick"``, ``"standard"`` (AutoAttack's recipe, default) or ``"thorough"``.
        n_classes: number of classes (default: the width of the model's output).
        device: where to run (default: the model's device); the model is moved there.
        seed: seeds every attack (and torch's global generator, for randomised models), so a run
            can be repeated exactly.
        batch_size: most points per forward pass, and the size of the chunks the points are
            attacked in (:mod:`.shards`): under ``torch.distributed`` each rank attacks its share
            of the chunks and every rank returns the merged report, equal to one process's.
        diagnostics_points: size of the subset the masking checks run on.
        eot_samples, votes: passes per gradient and per judgement for a randomised model.
        radius_threshold: the adversarial radius is the largest eps where accuracy stays at or
            above this fraction of the clean accuracy.
        positive_class: for binary/imbalanced data, the class whose precision/recall/F1 matter.
        examples: adversarial examples kept for the report's pictures.
    """
    start = time.perf_counter()
    x, y = _as_tensors(x, y)
    if threat is None:
        threat = ThreatModel(norm=norm, eps=eps, lower=lower, upper=upper, mask=mask)  # type: ignore[arg-type]
    if not threat.bounded:
        raise AdvtrainError("evaluate needs a finite eps")
    if not isinstance(model, nn.Module):
        raise AdvtrainError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    threat.validate(x)
    if device is not None:
        model = model.to(device)
    device = model_device(model, default=torch.device("cpu"))
    x, y = x.detach().to(device), y.to(device)

    with frozen(model):
        return _evaluate(
            model,
            x,
            y,
            threat,
            suite,
            n_classes,
            seed,
            batch_size,
            diagnostics_points,
            eot_samples,
            votes,
            radius_threshold,
            positive_class,
            examples,
            start,
            str(device),
        )


def _evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    suite: str,
    n_classes: int | None,
    seed: int,
    batch_size: int,
    diagnostics_points: int,
    eot_samples: int,
    votes: int,
    radius_threshold: float,
    positive_class: int | None,
    examples: int,
    start: float,
    device: str,
) -> Report:
    n = len(x)
    shards = Shards.current(n, batch_size)
    probe = x[: min(32, n)]
    with seeded(seed, x.device):
        randomized = is_randomized(model, probe) if n else False
        with torch.no_grad():
            probe_out = model(probe)
    if probe_out.dim() != 2:
        raise AdvtrainError(
            f"the model must return logits (N, C), got shape {tuple(probe_out.shape)}"
        )
    n_classes = n_classes or int(probe_out.shape[1])
    as_probs = looks_like_probabilities(probe_out)

    def judge(points: Tensor) -> Tensor:
        if randomized:
            return majority_vote(model, points, samples=votes, batch_size=batch_size * 4)
        return _argmax(model, points, batch_size)

    attack_model: nn.Module = model
    if as_probs:
        attack_model = LogProbabilities(attack_model)
    if randomized:
        attack_model = EOT(attack_model, samples=eot_samples)

    clean_pred = shards.map(judge, x, seed)
    correct = clean_pred == y.cpu()
    state = Cascade(x, y, threat, judge, correct.clone(), clean_pred.clone(), shards=shards)
    escalations: list[Escalation] = []
    steps = suite_attacks(suite, threat, n_classes, seed, batch_size)

    # What a naive evaluation would have said, for the report, when the model needed repair.
    if randomized or as_probs:
        naive = Cascade(
            x,
            y,
            threat,
            lambda p: _argmax(model, p, batch_size),
            correct.clone(),
            clean_pred.clone(),
            shards=shards,
        )
        naive.run(gradient_step(threat, seed=seed, batch_size=batch_size), model)
        reason = "randomness" if randomized else "probabilities instead of logits"
        action = (
            "EOT gradients and majority-vote judgement" if randomized else "attack through log(p)"
        )

    # --- the cascade
    white_box_survivors, square_broke = 0, 0
    first_broken = torch.zeros(n, dtype=torch.bool)  # by the first (iterative) attack
    for step in steps:
        if step.name == "square":
            white_box_survivors = int(state.standing.sum())
        broken_before = ~state.standing & correct
        broke = state.run(step, attack_model)
        if step.name == "square":
            square_broke = broke
        if step is steps[0]:
            first_broken = ~state.standing & correct & ~broken_before
    if randomized or as_probs:
        escalations.append(
            Escalation(
                reason, f"{action}: the whole cascade", naive.robust_accuracy, state.robust_accuracy
            )
        )

    # --- diagnostics on a subset of the correctly classified points (rank 0 runs them)
    found: list = []
    if shards.rank == 0:
        with seeded(seed, x.device):
            found = _diagnostics(
                attack_model,
                model,
                judge,
                threat,
                state,
                correct,
                steps[0],
                first_broken,
                randomized,
                as_probs,
                eot_samples,
                votes,
                diagnostics_points,
                seed,
                white_box_survivors,
                square_broke,
                any(s.name == "square" for s in steps),
            )
    found = shards.from_rank_zero(found)

    # --- escalation
    fired = {c.name for c in found if c.triggered}
    verdicts = {c.name for c in found if c.triggered and c.severity == VERDICT}
    white_box = "PGD with the sparse l1 step" if threat.norm == "l1" else "APGD"
    if verdicts & set(MASKING_CHECKS):
        before = state.robust_accuracy
        flat = "zero or NaN gradients" in verdicts
        repaired = StraightThrough(attack_model)
        state.run(
            gradient_step(
                threat, restarts=2, seed=seed + 21, batch_size=batch_size, note="(straight-through)"
            ),
            repaired,
        )
        if threat.norm != "l1":
            state.run(
                Step(
                    "apgd-t (straight-through)",
                    APGDT(
                        threat,
                        n_targets=min(9, n_classes - 1),
                        seed=seed + 22,
                        batch_size=batch_size,
                    ),
                ),
                repaired,
            )
            state.run(
                Step(
                    "square 10k x2",
                    Square(
                        threat, n_queries=10000, restarts=2, seed=seed + 23, batch_size=batch_size
                    ),
                ),
                attack_model,
            )
            # Label-only, where the gradients vanish: the scores are then often flat too (hard
            # labels, one-hot vectors, probabilities saturated to exact 0 and 1) and Square has
            # nothing to climb. Where only Square beat the gradients, the scores carry the
            # signal and HopSkipJump's 25,000 queries per survivor would add nothing.
            if flat:
                state.run(
                    Step("hopskipjump", HopSkipJump(threat, seed=seed + 25, batch_size=batch_size)),
                    attack_model,
                )
        escalations.append(
            Escalation(
                ", ".join(sorted(verdicts & set(MASKING_CHECKS))),
                "straight-through (BPDA) gradients for step functions, APGD-CE with restarts, "
                "APGD-T, Square with 10,000 queries and 2 restarts"
                + (", and HopSkipJump (label-only)" if flat else "")
                if threat.norm != "l1"
                else "straight-through (BPDA) gradients for step functions, PGD-l1 with restarts; there "
                "is no gradient-free l1 attack here, so the robust accuracy is only an upper bound",
                before,
                state.robust_accuracy,
            )
        )
    elif "black-box stronger than white-box" in fired and threat.norm != "l1":
        # A warning only (a few points): a second Square run with fresh randomness on the
        # survivors whose minimum adversarial perturbation found lies closest to eps.
        before = state.robust_accuracy
        closest = state.closest_standing(SECOND_SQUARE_SHARE, least=SECOND_SQUARE_LEAST)
        chosen = (
            "every surviving point"
            if len(closest) == int(state.standing.sum())
            else f"the {len(closest)} surviving points with the smallest robust margin"
        )
        state.run(
            Step(
                "square (second run)",
                Square(threat, n_queries=5000, seed=seed + 24, batch_size=batch_size),
            ),
            attack_model,
            among=closest,
        )
        escalations.append(
            Escalation(
                "black-box stronger than white-box",
                f"a second Square run (5,000 queries, new seed) on {chosen}",
                before,
                state.robust_accuracy,
            )
        )
    if "saturated softmax" in fired:
        before = state.robust_accuracy
        state.run(
            gradient_step(threat, loss="dlr", seed=seed + 31, batch_size=batch_size), attack_model
        )
        state.run(
            Step(
                "pgd-cw",
                PGD(
                    threat, steps=100, loss="cw", restarts=2, seed=seed + 32, batch_size=batch_size
                ),
            ),
            attack_model,
        )
        escalations.append(
            Escalation(
                "saturated softmax",
                f"{white_box} with the DLR loss and PGD with the CW margin loss",
                before,
                state.robust_accuracy,
            )
        )
    if "loss still improving" in fired:
        before = state.robust_accuracy
        for offset, loss in ((41, "ce"), (42, "dlr")):
            state.run(
                gradient_step(
                    threat,
                    loss=loss,
                    steps=400,
                    restarts=3,
                    seed=seed + offset,
                    batch_size=batch_size,
                ),
                attack_model,
            )
        escalations.append(
            Escalation(
                "loss still improving",
                f"{white_box} with the CE and the DLR loss, 400 iterations and 3 restarts",
                before,
                state.robust_accuracy,
            )
        )

    # --- robust margins of the points no minimum-norm attack has measured yet
    if threat.norm in ("linf", "l2"):
        state.measure(margin_attack(threat, n_classes, seed, batch_size), attack_model)

    return _report(
        model,
        x,
        y,
        threat,
        state,
        correct,
        clean_pred,
        found,
        escalations,
        suite,
        n_classes,
        seed,
        radius_threshold,
        positive_class,
        examples,
        start,
        device,
        randomized,
        as_probs,
        batch_size,
        votes,
    )


def _report(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    state: Cascade,
    correct: Tensor,
    clean_pred: Tensor,
    found: list,
    escalations: list[Escalation],
    suite: str,
    n_classes: int,
    seed: int,
    radius_threshold: float,
    positive_class: int | None,
    examples: int,
    start: float,
    device: str,
    randomized: bool,
    as_probs: bool,
    batch_size: int,
    votes: int,
) -> Report:
    clean_acc = float(correct.float().mean()) if len(x) else float("nan")
    robust_acc = state.robust_accuracy

    def logits(points: Tensor) -> Tensor:
        return _logits(model, points, batch_size, randomized, as_probs)

    logits_clean = state.shards.map(logits, x, seed)
    logits_adv = state.shards.map(logits, state.x_adv, seed)
    yc = y.cpu()
    margins = state.margin
    grid = metrics.eps_grid(threat.eps, margins[correct])
    broken_at_eps = correct & ~state.standing
    curve = metrics.accuracy_vs_eps(margins, correct, grid, [(threat.eps, broken_at_eps)])
    pred_clean, pred_adv = clean_pred.cpu(), state.adv_pred.cpu()
    classification = {
        "clean": metrics.classification_metrics(yc, pred_clean, n_classes),
        "adversarial": metrics.classification_metrics(yc, pred_adv, n_classes),
    }
    ran_min_norm = threat.norm in ("linf", "l2")
    per_sample = [
        {
            "index": i,
            "label": int(yc[i]),
            "clean_pred": int(pred_clean[i]),
            "adv_pred": int(pred_adv[i]),
            "broken_by": state.broken_by[i],
            "perturbation_norm": float(state.norm[i])
            if state.broken_by[i] not in (None, "clean")
            else None,
            "min_norm": float(margins[i]) if ran_min_norm else None,
        }
        for i in range(len(x))
    ]
    shown = _example_rows(state, correct, examples)
    return Report(
        clean_accuracy=clean_acc,
        robust_accuracy=robust_acc,
        per_attack=dict(state.per_attack),
        robustness_score=robustness_score(clean_acc, robust_acc),
        diagnostics=found,
        escalations=escalations,
        robust_margin=metrics.margin_summary(margins, correct) if ran_min_norm else {},
        accuracy_vs_eps=curve if ran_min_norm else [(threat.eps, robust_acc)],
        adversarial_radius=metrics.adversarial_radius(curve, clean_acc, radius_threshold)
        if ran_min_norm
        else None,
        radius_threshold=radius_threshold,
        entropy={
            "clean": float(metrics.entropy(logits_clean).mean()),
            "adversarial": float(metrics.entropy(logits_adv).mean()),
        },
        defensive_margin={
            "clean_true_probability": float(
                metrics.true_class_probability(logits_clean, yc).mean()
            ),
            "adversarial_true_probability": float(
                metrics.true_class_probability(logits_adv, yc).mean()
            ),
            "clean_logit_margin": float(metrics.logit_margin(logits_clean, yc).mean()),
            "adversarial_logit_margin": float(metrics.logit_margin(logits_adv, yc).mean()),
        },
        classification=classification,
        positive_class=positive_class,
        per_sample=per_sample,
        settings={
            "norm": threat.norm,
            "eps": threat.eps,
            "suite": suite,
            "n": len(x),
            "n_classes": n_classes,
            "seed": seed,
            "device": device,
            "randomized": randomized,
            "probabilities": as_probs,
            "processes": state.shards.world,
            "batch_size": batch_size,
            "seconds": time.perf_counter() - start,
        },
        examples={
            "x": state.x[shown].cpu(),
            "x_adv": state.x_adv[shown].cpu(),
            "y": yc[shown],
            "clean_pred": pred_clean[shown],
            "adv_pred": pred_adv[shown],
        },
    )


def _diagnostics(
    attack_model: nn.Module,
    model: nn.Module,
    judge: Callable[[Tensor], Tensor],
    threat: ThreatModel,
    state: Cascade,
    correct: Tensor,
    first: Step,
    first_broken: Tensor,
    randomized: bool,
    as_probs: bool,
    eot_samples: int,
    votes: int,
    points: int,
    seed: int,
    white_box_survivors: int,
    square_broke: int,
    ran_square: bool,
) -> list[Check]:
    """The gradient-masking checks, on up to ``points`` correctly classified points."""
    subset = _subset(correct, points, seed)
    xs, ys = state.x[subset], state.y[subset]
    found = [
        checks.randomness(randomized, eot_samples, votes),
        checks.probability_outputs(as_probs),
    ]
    if not len(subset):
        return found
    masked, saturated = checks.gradients(attack_model if not randomized else model, xs, ys)
    found += [
        masked,
        saturated,
        checks.single_step(
            attack_model, judge, threat, xs, ys, first_broken[subset], first.name, seed
        ),
        checks.unbounded(attack_model, judge, threat, xs, ys, seed),
        checks.eps_growth(attack_model, judge, threat, xs, ys, seed),
    ]
    if ran_square:
        found.append(checks.black_box(white_box_survivors, square_broke))
    found.append(
        checks.incomplete(attack_model, judge, threat, xs, ys, (~state.standing)[subset], seed)
    )
    return found


# ---------------------------------------------------------------------- helpers
def _as_tensors(x: Tensor | Iterable[Any], y: Tensor | None) -> tuple[Tensor, Tensor]:
    """``x, y`` as given, or concatenated from an iterable of ``(x, y)`` batches (a DataLoader)."""
    if isinstance(x, Tensor):
        if y is None:
            raise AdvtrainError("evaluate needs labels y with a tensor x")
        if not isinstance(y, Tensor) or y.shape != (len(x),):
            raise AdvtrainError(f"y must be a tensor of shape ({len(x)},)")
        return x, y
    if y is not None:
        raise AdvtrainError("pass either x and y tensors or one DataLoader of (x, y) batches")
    xs, ys = [], []
    try:
        for batch in x:
            bx, by = batch[0], batch[1]
            xs.append(bx)
            ys.append(by)
    except (TypeError, IndexError):
        raise AdvtrainError(
            "evaluate needs x, y tensors or an iterable of (x, y) batches"
        ) from None
    if not xs:
        raise AdvtrainError("the data loader gave no batches")
    return torch.cat(xs), torch.cat(ys)


def _argmax(model: nn.Module, points: Tensor, batch_size: int) -> Tensor:
    """The model's predicted labels, in batches."""
    if len(points) == 0:
        return torch.zeros(0, dtype=torch.int64, device=points.device)
    with torch.no_grad():
        return torch.cat(
            [
                model(points[i : i + batch_size]).argmax(dim=1)
                for i in range(0, len(points), batch_size)
            ]
        )


def _logits(
    model: nn.Module, x: Tensor, batch_size: int, randomized: bool, as_probs: bool
) -> Tensor:
    """Logits for the metrics: mean log-probabilities of a randomised model, log(p) of probabilities."""
    wrapped: nn.Module = model
    if as_probs:
        wrapped = LogProbabilities(wrapped)
    if randomized:
        wrapped = EOT(wrapped, samples=16)
    with torch.no_grad():
        parts = [wrapped(x[i : i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, 1)


def _subset(correct: Tensor, size: int, seed: int) -> Tensor:
    """Up to ``size`` correctly classified points, drawn with ``seed``, in index order."""
    index = correct.nonzero().squeeze(1)
    if len(index) > size:
        generator = torch.Generator().manual_seed(seed)
        index = index[torch.randperm(len(index), generator=generator)[:size]].sort().values
    return index


def _example_rows(state: Cascade, correct: Tensor, count: int) -> Tensor:
    """Indices of examples for the report's grid: broken points first, then survivors."""
    broken = (correct & ~state.standing).nonzero().squeeze(1)
    rest = state.standing.nonzero().squeeze(1)
    return torch.cat([broken, rest])[:count]
