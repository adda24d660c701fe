"""What a detector is worth: its figures on the standard suite's examples, then on an adaptive
attack against the pair, and the pair's robust accuracy.

Carlini & Wagner (AISec 2017) bypassed ten published detectors with attacks that knew the
detector was there; Tramèr, "Detecting adversarial examples is (nearly) as hard as classifying
them" (ICML 2022), showed that a detector robust at ``eps`` yields a classifier (possibly
inefficient) robust at ``eps / 2`` with the same robust accuracy, so a detection claim at
``eps`` must be read beside the best robust classifiers known at ``eps / 2``.

:func:`evaluate_detector` reports, on the test points ``x, y``:

- **non-adaptive**: the examples the standard suite (:func:`advtrain.evaluation.evaluate`)
  finds against the classifier alone; the positives are the points it classified correctly and
  the suite broke; the negatives are all the clean test points;
- **adaptive**: :class:`~.adaptive.DetectorAwarePGD` against classifier and detector together,
  on every point, aiming under the lower of the detector's own threshold and the threshold at
  5% FPR on the clean test points (so one run serves every figure); its positives are the
  correctly classified points whose example the classifier gets wrong;
- the adaptive attack runs from a random start, from the suite's examples and, for a detector
  with attack surrogates (feature squeezing: the classifier on each squeezed copy, and on the
  input and its copies at once), from PGD's examples against each; each point keeps the best run
  (Tramèr et al. 2020: start an adaptive attack where a strong one ended, and design it for the
  defence);
- for each: the TPR at 1% and 5% FPR (thresholds on the clean test scores), the AUROC of clean
  against adversarial scores, and the pair's robust accuracy at the detector's own threshold: a
  point is defended when the classifier gets it right or the detector flags it; the headline
  ``pair_robust_accuracy`` takes per point the worst of both attacks.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..attacks import PGD
from ..attacks.base import frozen, model_device
from ..errors import AdvtrainError
from ..threat import ThreatModel
from .adaptive import DetectorAwarePGD
from .base import Detector, threshold_at_fpr

if TYPE_CHECKING:
    from ..evaluation import Report

#: The false-positive rates the TPR is reported at.
FPRS = (0.01, 0.05)


def reduction_note(eps: float, norm: str) -> str:
    """Tramèr's reduction, stated for this threat model."""
    return (
        f"Tramèr 2022: a detector robust at {norm} eps={eps:g} implies a (possibly inefficient) "
        f"classifier robust at eps={eps / 2:g} with the pair's robust accuracy; read a pair's "
        f"figure beside the best robust classifiers known at eps={eps / 2:g}"
    )


@dataclass
class AttackFigures:
    """A detector's figures on one attack's examples."""

    n_adversarial: int  # positives: correctly classified points the attack made misclassified
    tpr_at_fpr: dict[str, float | None]  # "1%" / "5%" -> share of the positives flagged
    auroc: float | None  # clean test scores against the positives' scores
    pair_robust_accuracy: float  # classified right or flagged, at the detector's own threshold
    flagged_at_threshold: float | None  # share of the positives flagged at its own threshold


@dataclass
class DetectionReport:
    """:func:`evaluate_detector`'s figures; :meth:`to_dict` is the JSON, :meth:`summary` one
    line. The adaptive figures are the ones to lead with."""

    detector: str
    kind: str
    threshold: float
    target_fpr: float | None
    norm: str
    eps: float
    n: int
    clean_accuracy: float
    classifier_robust_accuracy: float  # the standard suite against the classifier alone
    pair_robust_accuracy: float  # per point the worst of both attacks: right or flagged on each
    clean_flagged: float  # clean test points above the detector's own threshold
    non_adaptive: AttackFigures
    adaptive: AttackFigures
    adaptive_attack: str
    reduction: str
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        def tpr(figures: AttackFigures) -> str:
            value = figures.tpr_at_fpr.get("5%")
            return "-" if value is None else f"{value:.2%}"

        return (
            f"detector {self.kind}: TPR at 5% FPR {tpr(self.adaptive)} adaptive "
            f"(n={self.adaptive.n_adversarial}), {tpr(self.non_adaptive)} on the suite's "
            f"examples (n={self.non_adaptive.n_adversarial}); pair robust accuracy "
            f"{self.pair_robust_accuracy:.2%} (adaptive {self.adaptive.pair_robust_accuracy:.2%}, "
            f"suite {self.non_adaptive.pair_robust_accuracy:.2%}), classifier alone "
            f"{self.classifier_robust_accuracy:.2%} ({self.norm} eps={self.eps:g}, "
            f"n={self.n}, clean flagged {self.clean_flagged:.2%}). {self.reduction}"
        )


def evaluate_detector(
    model: nn.Module,
    detector: Detector,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    report: Report | None = None,
    examples: Tensor | None = None,
    suite: str = "standard",
    seed: int = 0,
    batch_size: int = 1000,
    steps: int = 100,
    restarts: int = 1,
    weight: float = 1.0,
) -> DetectionReport:
    """The detector's figures on ``x, y`` (see the module docstring).

    Args:
        report: the suite's report on these points, evaluated with ``examples=len(x)`` so that
            it keeps every adversarial example (run here when None).
        examples: instead of the suite's, these non-adaptive adversarial examples of ``x`` (one
            per point, inside ``threat``; e.g. PGD's), whose accuracy is then the classifier's
            robust accuracy reported.
        suite, seed, batch_size: for the suite and the adaptive attack.
        steps, restarts, weight: the adaptive attack's (:class:`~.adaptive.DetectorAwarePGD`).
    """
    start = time.perf_counter()
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise AdvtrainError("evaluate_detector takes the test points as tensors")
    if detector.classifier is not model:
        raise AdvtrainError("the detector watches another model than the one evaluated")
    if detector.target_fpr is None:
        raise AdvtrainError("the detector has no threshold: calibrate it on clean data first")
    clean_logits, clean_scores = _logits_and_scores(detector, x, batch_size)
    correct = clean_logits.argmax(1) == y.cpu()
    if examples is not None:
        x_suite, source = _given_examples(examples, x, threat), "given examples"
        robust = float(
            (correct & (_logits_and_scores(detector, x_suite, batch_size)[0].argmax(1) == y.cpu()))
            .float()
            .mean()
        )
    else:
        if report is None:
            from ..evaluation import evaluate

            report = evaluate(
                model,
                x,
                y,
                threat=threat,
                suite=suite,
                seed=seed,
                batch_size=batch_size,
                examples=len(x),
            )
        x_suite, robust = suite_examples(report, x), report.robust_accuracy
        source = str(report.settings.get("suite", suite))
    thresholds = {f"{f:.0%}": threshold_at_fpr(clean_scores, f) for f in FPRS}
    aim = min(detector.threshold, thresholds["5%"])
    attack = DetectorAwarePGD(
        threat,
        detector=detector,
        threshold=aim,
        steps=steps,
        restarts=restarts,
        seed=seed,
        batch_size=batch_size,
        weight=weight,
    )
    found = attack.outcome(model, x, y)
    found.merge(attack.refine(model, x, y, x_suite.to(x.device)), torch.arange(len(x)))
    for surrogate in detector.attack_surrogates():  # PGD on each, then the pair's descent
        starts = PGD(threat, steps=steps, seed=seed, batch_size=batch_size)(surrogate, x, y)
        found.merge(attack.refine(model, x, y, starts), torch.arange(len(x)))
    x_adaptive = found.x_adv
    if not bool(threat.contains(x_adaptive, x).all()):
        raise AdvtrainError(
            "the adaptive attack left the threat model (a bug): refusing its figures"
        )
    figures, defended = {}, torch.ones(len(x), dtype=torch.bool)
    for name, x_adv in (("non_adaptive", x_suite), ("adaptive", x_adaptive)):
        logits, scores = _logits_and_scores(detector, x_adv, batch_size)
        figures[name] = _figures(
            detector, y.cpu(), correct, logits, scores, clean_scores, thresholds
        )
        defended &= (logits.argmax(1) == y.cpu()) | detector.flagged(scores)
    return DetectionReport(
        detector=detector.describe(),
        kind=detector.kind,
        threshold=detector.threshold,
        target_fpr=detector.target_fpr,
        norm=threat.norm,
        eps=threat.eps,
        n=len(x),
        clean_accuracy=float(correct.float().mean()) if len(x) else float("nan"),
        classifier_robust_accuracy=robust,
        pair_robust_accuracy=float(defended.float().mean()) if len(x) else float("nan"),
        clean_flagged=float(detector.flagged(clean_scores).float().mean()),
        non_adaptive=figures["non_adaptive"],
        adaptive=figures["adaptive"],
        adaptive_attack=repr(attack),
        reduction=reduction_note(threat.eps, threat.norm),
        settings={
            "suite": source,
            "seed": seed,
            "thresholds_at_fpr": thresholds,
            "adaptive_threshold": aim,
            "seconds": time.perf_counter() - start,
        },
    )


def suite_examples(report: Report, x: Tensor) -> Tensor:
    """Per point, the suite's adversarial example (the clean input where it found none), from a
    report kept with ``examples=len(x)``: its examples are the broken points, then the standing
    ones, each in index order."""
    records = report.per_sample
    if len(records) != len(x):
        raise AdvtrainError(f"the report covers {len(records)} points, not the {len(x)} given")
    broken = [i for i, r in enumerate(records) if r["broken_by"] not in (None, "clean")]
    standing = [i for i, r in enumerate(records) if r["broken_by"] is None]
    index = torch.tensor(broken + standing, dtype=torch.int64)
    kept = report.examples.get("x_adv")
    if kept is None or len(kept) < len(index):
        raise AdvtrainError(
            "the report keeps too few adversarial examples: evaluate with examples=len(x)"
        )
    if not torch.equal(report.examples["x"][: len(index)], x[index].cpu()):
        raise AdvtrainError("the report's examples are not of these test points")
    out = x.detach().cpu().clone()
    out[index] = kept[: len(index)].to(out.dtype)
    return out


def _given_examples(examples: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
    if not isinstance(examples, Tensor) or examples.shape != x.shape:
        raise AdvtrainError("examples must be one adversarial example per test point, shaped as x")
    if not bool(threat.contains(examples.to(x.device), x).all()):
        raise AdvtrainError("the given examples are not all inside the threat model")
    return examples.detach().cpu()


def _logits_and_scores(detector: Detector, x: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    device = model_device(detector.classifier, default=x.device)
    logits, scores = [], []
    with frozen(detector.classifier), frozen(detector), torch.no_grad():
        for i in range(0, len(x), batch_size):
            z, s = detector.logits_and_score(x[i : i + batch_size].to(device))
            logits.append(z.float().cpu())
            scores.append(s.float().cpu())
    return torch.cat(logits), torch.cat(scores)


def _figures(
    detector: Detector,
    y: Tensor,
    correct: Tensor,
    logits: Tensor,
    scores: Tensor,
    clean_scores: Tensor,
    thresholds: dict[str, float],
) -> AttackFigures:
    positive = correct & (logits.argmax(1) != y)
    adversarial = scores[positive]
    defended = (logits.argmax(1) == y) | detector.flagged(scores)
    n = int(positive.sum())
    return AttackFigures(
        n_adversarial=n,
        tpr_at_fpr={
            k: float((adversarial > t).float().mean()) if n else None for k, t in thresholds.items()
        },
        auroc=auroc(clean_scores, adversarial),
        pair_robust_accuracy=float(defended.float().mean()) if len(y) else float("nan"),
        flagged_at_threshold=float(detector.flagged(adversarial).float().mean()) if n else None,
    )


def auroc(negative: Tensor, positive: Tensor) -> float | None:
    """The area under the ROC curve of ``positive`` against ``negative`` scores (ties count
    half, Mann-Whitney); None when either is empty."""
    if not len(negative) or not len(positive):
        return None
    from scipy.stats import rankdata

    scores = torch.cat([negative, positive]).double().numpy()
    ranks = rankdata(scores)  # ties get their average rank
    n_neg, n_pos = len(negative), len(positive)
    u = float(ranks[n_neg:].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_neg * n_pos)
