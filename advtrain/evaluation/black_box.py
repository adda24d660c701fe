"""Black-box evaluation: the robust accuracy of a model seen only through its outputs.

For the models a fraud team runs in production (tree ensembles,
:class:`~advtrain.models.trees.TreeEnsemble`) there is no gradient to follow, so the white-box
cascade of :func:`advtrain.evaluate` does not apply. :func:`evaluate_black_box` runs, with the
survivor cascade of :mod:`.cascade` (each attack only on the correctly classified points that
every attack before it failed to break; AutoAttack's recipe, Croce & Hein 2020):

1. ``feature-search``: score-based random search over random subsets of the features
   (:class:`~advtrain.attacks.FeatureSearch`, after Square Attack, Andriushchenko et al. 2020);
2. ``hop-skip-jump``: decision-based, from the predicted labels only
   (:class:`~advtrain.attacks.HopSkipJump`, Chen, Jordan & Wainwright 2020);
3. ``transfer`` (when a ``surrogate`` is given): PGD on a differentiable model trained by the
   caller on the same table, judged on the target (:class:`~advtrain.attacks.Transfer`;
   Papernot et al. 2016).

Every candidate counts only when the threat model contains it (ball, bounds, immutable features
and a table's constraints: :meth:`~advtrain.threat.ThreatModel.contains`) and the target
misclassifies it; the cascade refuses the others and counts them. An attacker who knows the
model's internals may break more points, so the figures are upper bounds on the robust
accuracy: the report says so in its settings (``bound``, ``note``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks import FeatureSearch, HopSkipJump, Transfer
from ..attacks.base import frozen, model_device
from ..errors import AdvtrainError
from ..threat import ThreatModel
from ..util import check_positive_int
from . import metrics
from .cascade import Cascade
from .context import argmax, check_classes
from .records import feasibility, per_sample_records
from .report import Report, robustness_score
from .shards import Shards
from .steps import Step, step_loss

#: What the figures of a black-box evaluation are, as its report says it.
BLACK_BOX_NOTE = (
    "black-box upper bound on robust accuracy: the attacks saw only the model's scores, its "
    "labels and a surrogate's gradients; an attacker who knows the model may break more points"
)
#: The names of the cascade's steps, in the order they run.
BLACK_BOX_STEPS = ("feature-search", "hop-skip-jump", "transfer")


def black_box_steps(
    threat: ThreatModel,
    *,
    surrogate: nn.Module | None = None,
    seed: int = 0,
    queries: int = 1000,
    batch_size: int | None = None,
) -> list[Step]:
    """The black-box cascade: feature search (``queries`` per point), HopSkipJump (``queries``
    per point), and transfer from ``surrogate`` (PGD-40 on it, every step taken) when given;
    each attack seeded from its name (:meth:`.steps.Step.seeded`)."""
    search, labels, transfer = BLACK_BOX_STEPS
    steps = [
        Step(search, FeatureSearch(threat, n_queries=queries, batch_size=batch_size)),
        Step(labels, HopSkipJump(threat, n_queries=queries, batch_size=batch_size)),
    ]
    if surrogate is not None:
        steps.append(Step(transfer, Transfer(surrogate, threat, batch_size=batch_size)))
    return [step.seeded(seed) for step in steps]


def evaluate_black_box(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    surrogate: nn.Module | None = None,
    seed: int = 0,
    queries: int = 1000,
    batch_size: int = 1000,
    positive_class: int | None = None,
    attack_classes: Sequence[int] | None = None,
    examples: int = 8,
) -> Report:
    """Evaluate ``model`` (any module returning scores: logits or log-probabilities; no gradient
    is taken of it) on encoded rows ``x`` with labels ``y`` under ``threat`` (linf or l2).

    Args:
        surrogate: a differentiable model of the same rows, trained by the caller on the same
            table; its PGD examples are judged on ``model`` (the ``transfer`` step). None: no
            transfer step.
        seed: the base seed; each attack's seed comes from it and the attack's name.
        queries: model queries per point for the feature search and for HopSkipJump each
            (default 1000).
        batch_size: points per chunk of the cascade and per forward pass.
        positive_class: the class whose recall, precision, PR-AUC and ROC-AUC are reported
            clean and attacked (``Report.positive_metrics``; no operating point here).
        attack_classes: attack only the points of these true classes (fraud rows); the others
            keep their clean prediction.
        examples: adversarial examples kept for the report.

    Returns a :class:`~.report.Report` whose ``robust_accuracy`` is a black-box upper bound
    (``settings["bound"] == "upper"``, ``settings["note"]``).
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise AdvtrainError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if surrogate is not None and not isinstance(surrogate, nn.Module):
        raise AdvtrainError(f"surrogate must be a torch.nn.Module, got {type(surrogate).__name__}")
    if not isinstance(threat, ThreatModel):
        raise AdvtrainError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    if threat.norm not in FeatureSearch.norms or not threat.bounded:
        raise AdvtrainError(
            f"black-box evaluation needs a finite linf or l2 threat model, got {threat.norm} "
            f"eps={threat.eps:g}"
        )
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or y.shape != (len(x),):
        raise AdvtrainError("evaluate_black_box needs tensors x (n, ...) and y (n,)")
    check_positive_int("queries", queries)
    check_positive_int("batch_size", batch_size)
    threat.validate(x)
    device = model_device(model, default=x.device)
    x, y = x.detach().to(device), y.to(device)
    with frozen(model):
        shards = Shards.current(len(x), batch_size)
        logits_clean = shards.map(lambda rows: _scores(model, rows, batch_size), x, seed)
        n_classes = int(logits_clean.shape[1]) if len(x) else 0
        if positive_class is not None:
            check_classes("positive_class", [positive_class], n_classes)
        checked = (
            None
            if attack_classes is None
            else check_classes("attack_classes", attack_classes, n_classes)
        )
        clean_pred = logits_clean.argmax(1)
        correct = clean_pred == y.cpu()
        attackable = (
            torch.ones(len(x), dtype=torch.bool)
            if checked is None
            else torch.isin(y.cpu(), torch.tensor(checked, dtype=y.dtype))
        )
        state = Cascade(
            x,
            y,
            threat,
            lambda points: argmax(model, points, batch_size).cpu(),
            correct.clone(),
            clean_pred.clone(),
            shards=shards,
            attackable=attackable,
        )
        steps = black_box_steps(
            threat, surrogate=surrogate, seed=seed, queries=queries, batch_size=batch_size
        )
        for step in steps:
            state.run(step, model)
            if isinstance(step.attack, Transfer):  # the loss it ascends is the surrogate's
                state.losses[step.name] = f"{step_loss(step.attack.crafting)} on the surrogate"
        logits_adv = shards.map(lambda rows: _scores(model, rows, batch_size), state.x_adv, seed)
    return _report(
        state,
        correct,
        clean_pred,
        logits_clean,
        logits_adv,
        {
            "n_classes": n_classes,
            "seed": seed,
            "queries": queries,
            "batch_size": batch_size,
            "positive_class": positive_class,
            "attack_classes": checked,
            "surrogate": None if surrogate is None else type(surrogate).__name__,
            "device": str(device),
            "examples": examples,
            "started": start,
        },
    )


def _scores(model: nn.Module, points: Tensor, batch_size: int) -> Tensor:
    """The model's scores of ``points``, in batches, on the CPU (float32)."""
    with torch.no_grad():
        parts = [
            model(points[i : i + batch_size]).float().cpu()
            for i in range(0, len(points), batch_size)
        ]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def _report(
    state: Cascade,
    correct: Tensor,
    clean_pred: Tensor,
    logits_clean: Tensor,
    logits_adv: Tensor,
    run: dict[str, Any],
) -> Report:
    """The report of a black-box cascade, in the fields :func:`advtrain.evaluate` fills."""
    threat, n = state.threat, len(state.x)
    yc, pred_adv = state.y.cpu(), state.adv_pred.cpu()
    clean_acc = float(correct.float().mean()) if n else float("nan")
    robust_acc = state.robust_accuracy
    positive = run["positive_class"]
    positive_metrics = None
    if positive is not None:
        positive_metrics = {
            "positive_class": positive,
            "score": "z_p - max_{c != p} z_c (two classes: the log-odds of the positive class)",
            "clean": metrics.positive_class_metrics(
                yc, clean_pred, metrics.positive_score(logits_clean, positive), positive
            ),
            "attacked": metrics.positive_class_metrics(
                yc, pred_adv, metrics.positive_score(logits_adv, positive), positive
            ),
        }
    attacked = run["attack_classes"]
    per_sample = per_sample_records(
        state, yc, clean_pred, pred_adv, None, None if attacked is None else state.attackable
    )
    broken = (correct & ~state.standing).nonzero().squeeze(1)
    shown = torch.cat([broken, state.standing.nonzero().squeeze(1)])[: run["examples"]]
    used = dict(state.losses)
    return Report(
        clean_accuracy=clean_acc,
        robust_accuracy=robust_acc,
        per_attack=dict(state.per_attack),
        robustness_score=robustness_score(clean_acc, robust_acc),
        diagnostics=[],
        escalations=[],
        robust_margin={},
        accuracy_vs_eps=[(threat.eps, robust_acc)],
        adversarial_radius=None,
        radius_threshold=0.5,
        entropy={
            "clean": float(metrics.entropy(logits_clean).mean()) if n else float("nan"),
            "adversarial": float(metrics.entropy(logits_adv).mean()) if n else float("nan"),
        },
        defensive_margin=metrics.defensive_margins(logits_clean, logits_adv, yc),
        classification={
            "clean": metrics.classification_metrics(yc, clean_pred, run["n_classes"]),
            "adversarial": metrics.classification_metrics(yc, pred_adv, run["n_classes"]),
        },
        positive_class=positive,
        per_sample=per_sample,
        settings={
            "norm": threat.norm,
            "eps": threat.eps,
            "suite": "black-box",
            "bound": "upper",
            "note": BLACK_BOX_NOTE,
            "n": n,
            "n_classes": run["n_classes"],
            "seed": run["seed"],
            "queries": run["queries"],
            "surrogate": run["surrogate"],
            "device": run["device"],
            "randomized": False,
            "probabilities": False,
            "processes": state.shards.world,
            "batch_size": run["batch_size"],
            "seconds": time.perf_counter() - run["started"],
        },
        examples={
            "x": state.x[shown].cpu(),
            "x_adv": state.x_adv[shown].cpu(),
            "y": yc[shown],
            "clean_pred": clean_pred[shown],
            "adv_pred": pred_adv[shown],
        },
        losses={"per_step": used, "used": sorted(set(used.values())), "skipped": {}},
        attack_classes=None if attacked is None else list(attacked),
        positive_metrics=positive_metrics,
        feasibility=feasibility(state.threat, [state]),
    )


__all__ = ["BLACK_BOX_NOTE", "BLACK_BOX_STEPS", "black_box_steps", "evaluate_black_box"]
