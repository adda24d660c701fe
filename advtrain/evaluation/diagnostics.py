"""Gradient-masking diagnostics: cheap checks that a robustness number can be trusted.

After Athalye, Carlini & Wagner (ICML 2018), Carlini et al. ("On evaluating adversarial
robustness", 2019) and Pintor et al. ("Indicators of attack failure", NeurIPS 2022). Each check
runs on a small seeded subset of the correctly classified points and returns a
:class:`~advtrain.evaluation.report.Check` with its evidence.

Verdicts (fire only when the evaluation is provably incomplete; an honestly robust model does
not trigger them): zero or NaN gradients of the logit margin; a single step breaking more points
than the iterative attack; an unbounded attack failing; success shrinking as eps grows; the
black-box attack breaking a clear share of the white-box survivors. Warnings (can fire on an
honest model; the evaluation escalates anyway): randomness; probabilities instead of logits;
saturated softmax; a longer attack still breaking points (incomplete optimisation).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..attacks import APGD, FGSM, PGD
from ..attacks.gradient import input_gradient
from ..losses import cross_entropy, cw_margin
from ..threat import ThreatModel
from .findings import VERDICT, WARNING, Check, CheckName
from .steps import gradient_step

Judge = Callable[[Tensor], Tensor]
#: The cross-entropy under which a stalled point leaves the longer run of :func:`incomplete`:
#: half the least loss of a misclassified point (``ln 2``, where the true class's probability
#: is one half at most).
SETTLED_LOSS = math.log(2) / 2


def _rate(broken: Tensor) -> float:
    return float(broken.float().mean()) if len(broken) else 0.0


def randomness(randomized: bool, eot_samples: int, votes: int) -> Check:
    detail = (
        f"repeated forward passes on the same inputs disagree: the model is randomised; "
        f"attacked through EOT over {eot_samples} passes and judged by a majority vote of "
        f"{votes} passes"
        if randomized
        else "repeated forward passes agree"
    )
    return Check(CheckName.RANDOMNESS, randomized, detail, WARNING, {"randomized": randomized})


def probability_outputs(is_probs: bool) -> Check:
    detail = (
        "the model returns probabilities, not logits: attacked through log(p)"
        if is_probs
        else "the model returns logits"
    )
    return Check(CheckName.PROBABILITIES, is_probs, detail, WARNING)


def gradients(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Check, Check]:
    """Two checks from one pass: zero/NaN gradients of the logit margin (verdict) and a saturated
    softmax, where cross-entropy has a zero gradient but the margin does not (warning)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        margin = cw_margin(logits, y)
        ce = cross_entropy(logits, y)
    g_margin = input_gradient(margin.sum(), x, retain_graph=True)
    g_ce = input_gradient(ce.sum(), x)
    n = len(x)
    flat_m, flat_ce = g_margin.flatten(1), g_ce.flatten(1)
    nan = ~torch.isfinite(flat_m).all(dim=1)
    zero = (flat_m.abs().amax(dim=1) == 0) & ~nan
    ce_zero = (flat_ce.abs().amax(dim=1) == 0) & ~zero & ~nan
    bad = float((nan | zero).float().mean()) if n else 0.0
    evidence = {"points": n, "zero_gradient": int(zero.sum()), "nan_gradient": int(nan.sum())}
    masked = Check(
        CheckName.ZERO_GRADIENTS,
        bad > 0.1,
        f"the gradient of the logit margin is zero at {int(zero.sum())} and NaN at "
        f"{int(nan.sum())} of {n} points: gradients are shattered or obfuscated"
        if bad > 0.1
        else f"the logit margin has a usable gradient at {n - int((nan | zero).sum())} of {n} "
        "points",
        VERDICT,
        evidence,
    )
    share = float(ce_zero.float().mean()) if n else 0.0
    logit_gap = float(-margin.detach().median()) if n else 0.0
    saturated = Check(
        CheckName.SATURATED_SOFTMAX,
        share > 0.1,
        f"cross-entropy has an exactly zero gradient at {int(ce_zero.sum())} of {n} points "
        f"(median logit margin {logit_gap:.3g}): huge logits, as after defensive distillation; "
        "margin and DLR losses are used"
        if share > 0.1
        else f"cross-entropy gradients are non-zero (median logit margin {logit_gap:.3g})",
        WARNING,
        {"points": n, "ce_zero_gradient": int(ce_zero.sum()), "median_logit_margin": logit_gap},
    )
    return masked, saturated


def single_step(
    model: nn.Module,
    judge: Judge,
    threat: ThreatModel,
    x: Tensor,
    y: Tensor,
    iterative_broken: Tensor,
    iterative_name: str,
    seed: int,
) -> Check:
    """FGSM against the cascade's first iterative attack (``iterative_name``) on the same
    points."""
    fgsm_broken = (judge(FGSM(threat, seed=seed)(model, x, y)) != y).cpu()
    extra = fgsm_broken & ~iterative_broken
    fired = _rate(fgsm_broken) > _rate(iterative_broken) and int(extra.sum()) >= 2
    return Check(
        CheckName.SINGLE_STEP,
        fired,
        f"FGSM breaks {_rate(fgsm_broken):.1%} of {len(x)} points, {iterative_name.upper()} "
        f"{_rate(iterative_broken):.1%}; "
        f"{int(extra.sum())} points fall to FGSM only",
        VERDICT,
        {
            "points": len(x),
            "fgsm": _rate(fgsm_broken),
            "iterative": _rate(iterative_broken),
            "fgsm_only": int(extra.sum()),
        },
    )


def unbounded(
    model: nn.Module, judge: Judge, threat: ThreatModel, x: Tensor, y: Tensor, seed: int
) -> Check:
    """A PGD with the margin loss and a radius spanning the whole input box must succeed."""
    lower, upper = threat._bounds_like(x)
    span = threat.apply_mask((upper - lower).expand_as(x[:1]))
    radius = (
        float(span.abs().amax())
        if threat.norm == "linf"
        else float(span.flatten().norm(p=2 if threat.norm == "l2" else 1))
    )
    big = threat.replace(eps=max(radius, threat.eps))
    broken = (judge(PGD(big, steps=100, loss="cw", seed=seed)(model, x, y)) != y).cpu()
    rate = _rate(broken)
    if _restricted(threat):
        # immutable features or table constraints: the true class may hang on what the attacker
        # cannot change, so no success rate is owed; reported, never a verdict
        return Check(
            CheckName.UNBOUNDED,
            False,
            f"PGD at eps={big.eps:.3g} breaks {rate:.1%} of {len(x)} points; not judged: "
            "immutable features or constraints keep part of every input out of reach",
            WARNING,
            {"points": len(x), "eps": big.eps, "success": rate, "judged": False},
        )
    return Check(
        CheckName.UNBOUNDED,
        rate < 0.95,
        f"PGD at eps={big.eps:.3g}, which reaches any valid input, breaks {rate:.1%} of "
        f"{len(x)} points" + (" (it should break all)" if rate < 0.95 else ""),
        VERDICT,
        {"points": len(x), "eps": big.eps, "success": rate},
    )


def _restricted(threat: ThreatModel) -> bool:
    """Whether some valid inputs are out of the attacker's reach whatever the radius."""
    if threat.constraints is not None:
        return True
    return threat.mask is not None and not bool(threat.mask.all())


def eps_growth(
    model: nn.Module, judge: Judge, threat: ThreatModel, x: Tensor, y: Tensor, seed: int
) -> Check:
    """Success of one attack at growing radii must not fall."""
    factors = (0.25, 0.5, 1.0, 2.0)
    rates = []
    for factor in factors:
        attack = PGD(threat.replace(eps=threat.eps * factor), steps=50, loss="cw", seed=seed)
        rates.append(_rate((judge(attack(model, x, y)) != y).cpu()))
    tolerance = max(0.05, 2 / max(len(x), 1))
    drops = [(a, b) for a, b in zip(rates, rates[1:]) if b < a - tolerance]
    curve = ", ".join(f"{f:g} eps: {r:.1%}" for f, r in zip(factors, rates))
    return Check(
        CheckName.EPS_GROWTH,
        bool(drops),
        f"PGD-50 (margin loss) success rate at {curve}",
        VERDICT,
        {"points": len(x), "factors": list(factors), "success": rates},
    )


def black_box(white_box_survivors: int, broken_by_square: int) -> Check:
    """Share of the points that survived every white-box attack and fell to Square."""
    share = broken_by_square / white_box_survivors if white_box_survivors else 0.0
    fired = broken_by_square >= 3 and share >= 0.05
    return Check(
        CheckName.BLACK_BOX,
        fired or broken_by_square > 0,
        f"Square (no gradients) breaks {broken_by_square} of the {white_box_survivors} points "
        f"that survived every gradient attack ({share:.1%})",
        VERDICT if fired else WARNING,
        {"white_box_survivors": white_box_survivors, "square_broke": broken_by_square},
    )


def incomplete(
    model: nn.Module,
    judge: Judge,
    threat: ThreatModel,
    x: Tensor,
    y: Tensor,
    cascade_broken: Tensor,
    seed: int,
) -> Check:
    """A four-times longer APGD-CE (400 iterations; PGD-l1 for l1), on the subset: does it break
    what the cascade missed?

    The longer run only needs to find the points it breaks, so APGD-CE lets a point go at a
    checkpoint once it has settled far from the decision boundary (:data:`SETTLED_LOSS`:
    cross-entropy below ``ln(2) / 2``, where a misclassified point's is at least ``ln 2``,
    having risen by less than :data:`~advtrain.attacks.apgd.SETTLE_TOLERANCE` since the previous
    checkpoint), instead of running it for all 400 iterations; every other point runs them all.
    """
    survivors = ~cascade_broken
    extra = 0
    if bool(survivors.any()):
        xs, ys = x[survivors], y[survivors]
        attack = (
            gradient_step(threat, steps=400, seed=seed).attack
            if threat.norm == "l1"
            else APGD(threat, steps=400, seed=seed, settle_below=SETTLED_LOSS)
        )
        extra = int((judge(attack(model, xs, ys)) != ys).sum())
    fired = extra >= 2 and extra >= 0.02 * len(x)
    return Check(
        CheckName.LOSS_IMPROVING,
        fired,
        f"{'PGD-l1' if threat.norm == 'l1' else 'APGD-CE'} with 400 iterations breaks {extra} "
        f"more of {len(x)} points than "
        "the cascade" + ("; the optimisation had not converged" if fired else ""),
        WARNING,
        {"points": len(x), "extra_broken": extra},
    )
