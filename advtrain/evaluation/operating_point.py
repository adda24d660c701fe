"""The positive class at an operating point: its figures clean and attacked.

A fraud team does not run its model at the argmax: it flags a transaction when the positive
class's score passes a threshold chosen for an acceptable false-positive rate. An attack that
only has to cross the argmax boundary answers another question, so the recall at a fixed
false-positive rate is measured by attacking the thresholded classifier itself:

1. Score every point clean (:func:`.metrics.positive_score`: ``z_p - max_{c != p} z_c``) and set
   the threshold on the clean negatives so that the false-positive rate is at most ``fpr``
   (:func:`.metrics.threshold_at_fpr`).
2. Build the thresholded classifier (:class:`.context.ShiftedLogit`: the positive logit lowered
   by the threshold, so its argmax is the decision at the operating point), wrapped as the
   model is (log(p), EOT, majority vote).
3. Attack the positives it flags, among the points an attacker moves (``attack_classes``): first
   with the adversarial points the argmax cascade found for them (named
   :data:`FROM_ARGMAX`; below a non-negative threshold every one of them also escapes the flag),
   then with the suite's cascade (:func:`.steps.suite_attacks`, each step seeded from its name
   scoped by :data:`SCOPE`), on the thresholded classifier. The diagnostics and escalations run
   on the argmax cascade only.
4. Recall at the operating point, clean and attacked: the share of positives the thresholded
   classifier flags before and after. Negatives are not attacked here (an attacker of a fraud
   model hides fraud; he does not raise alarms), so the attacked false-positive rate is the
   clean one.

The cascade's refusals (outputs outside the threat model or its feature constraints) are
counted as in the argmax cascade.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import metrics
from .cascade import Cascade
from .context import EvalContext, cascade_for
from .steps import suite_attacks

#: The label of the argmax cascade's adversarial points tried first at the operating point.
FROM_ARGMAX = "argmax cascade"
#: The scope of the operating point's step seeds (:meth:`.steps.Step.seeded`).
SCOPE = "operating point: "
#: How the recall at a fixed false-positive rate is measured, as the report says it.
METHOD = (
    "threshold on the clean negatives' positive-class scores (z_p - max other logit) for a "
    "false-positive rate at most fpr; the thresholded classifier (positive logit lowered by "
    "the threshold, so its argmax is the decision at the operating point) is attacked on the "
    "flagged positives (the argmax cascade's adversarial points first, then the suite's "
    "cascade); negatives are not attacked"
)


def evaluate_operating_point(
    ctx: EvalContext, main: Cascade, clean_scores: Tensor, positive: int, fpr: float
) -> tuple[dict[str, Any], Cascade | None]:
    """The recall of ``positive`` at false-positive rate ``fpr``, clean and attacked, and the
    cascade run at the operating point (None when there was nothing to attack)."""
    y = ctx.y.cpu()
    negative, is_positive = y != positive, y == positive
    if not bool(negative.any()) or not bool(is_positive.any()):
        return {
            "fpr": fpr,
            "threshold": None,
            "note": "no operating point: the data needs positive and negative points",
        }, None
    threshold = metrics.threshold_at_fpr(clean_scores, negative, fpr)
    op = ctx.at_threshold(positive, threshold)
    clean_pred = op.shards.map(op.judge, op.x, op.seed).cpu()
    state = cascade_for(op, "operating point", clean_pred, attackable=ctx.attackable & is_positive)
    attacked = state.indices()
    if len(attacked):
        broken = [i for i in attacked.tolist() if main.broken_by[i] not in (None, "clean")]
        if broken:
            index = torch.tensor(broken, dtype=torch.int64)
            state.record(index, main.x_adv[index.to(main.x_adv.device)], FROM_ARGMAX)
            state.per_attack[FROM_ARGMAX] = state.robust_accuracy
        steps = suite_attacks(op.settings.suite, op.threat, op.n_classes, op.seed, op.batch_size)
        for step in steps:
            if not len(state.indices()):
                break
            state.run(step.seeded(op.seed, scope=SCOPE), op.attack_model)
    flagged_clean = clean_pred == positive
    flagged_adv = state.adv_pred.cpu() == positive
    positives, negatives = int(is_positive.sum()), int(negative.sum())
    figures: dict[str, Any] = {
        "fpr": fpr,
        "threshold": threshold,
        "clean_fpr": int((flagged_clean & negative).sum()) / negatives,
        "recall_clean": int((flagged_clean & is_positive).sum()) / positives,
        "recall_attacked": int((flagged_adv & is_positive).sum()) / positives,
        "positives": positives,
        "positives_attacked": len(attacked),
        "per_attack": {name: _recall(state, name, is_positive) for name in state.per_attack},
        "method": METHOD,
    }
    if ctx.n_classes == 2:
        figures["threshold_probability"] = 1 / (1 + math.exp(-threshold))
    return figures, state


def _recall(state: Cascade, name: str, is_positive: Tensor) -> float:
    """Recall at the operating point after the step ``name``, from the robust accuracy the
    cascade recorded: only flagged positives are attacked and no other point changes, so the
    positives standing then are the positives still flagged."""
    others = int((state.standing.cpu() & ~is_positive).sum())
    standing = round(state.per_attack[name] * len(state.x))
    return max(standing - others, 0) / int(is_positive.sum())
