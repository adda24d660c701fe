"""What an evaluation found, as one object: figures, diagnostics, per-sample results.

:class:`Report` is what :func:`advtrain.evaluate` returns. ``to_dict``/``to_json`` give every
figure (the JSON file is the record other tools read); ``to_html`` writes a self-contained page
(:mod:`advtrain.evaluation.html`, which knows the report only by the methods it calls, so the
page's module does not import this one). Tensors of example images are kept for the page only.
The diagnostics' records (:class:`Check`, :class:`Escalation`) live in :mod:`.findings`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import AdvtrainError
from ..util import atomic_write_json, atomic_write_text
from .findings import VERDICT, WARNING, Check, CheckName, Escalation
from .html import render_html

__all__ = [
    "REPORT_FORMAT_VERSION",
    "VERDICT",
    "WARNING",
    "Check",
    "CheckName",
    "ClassMetrics",
    "Escalation",
    "Report",
    "report_format_version",
    "robustness_score",
]

#: The layout version of a report's JSON file (its ``format_version``). 1: the reports written
#: before the field existed, which have none; 2: the same fields with ``format_version``. A
#: reader takes every version up to this one.
REPORT_FORMAT_VERSION = 2


@dataclass
class ClassMetrics:
    """Precision, recall and F1 of one class (or their macro average), with its support."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class Report:
    """The result of :func:`advtrain.evaluate`.

    Attributes:
        clean_accuracy: accuracy on the clean inputs.
        robust_accuracy: accuracy under the worst case over every attack run (the cascade and
            any escalation), per sample.
        per_attack: robust accuracy after each attack of the cascade, in the order run (each
            value counts the points still standing after that attack and all before it).
        robustness_score: harmonic mean of clean and robust accuracy
            (``2 * clean * robust / (clean + robust)``, 0 when both are 0).
        diagnostics: the gradient-masking checks, each with ``name``, ``triggered``, ``detail``.
        escalations: the stronger attacks run because a check fired, with robust accuracy
            before and after.
        robust_margin: summary of the per-sample minimum adversarial perturbation norm
            (``median``, ``mean``, ``found``: the fraction with one found, ``histogram``).
        accuracy_vs_eps: ``[(eps, accuracy), ...]``, from the minimum-norm results and checks at
            fixed eps.
        adversarial_radius: the largest eps of that curve at which accuracy stays at or above
            ``radius_threshold`` times the clean accuracy (``None`` if none).
        entropy: mean predictive entropy (nats) on clean and adversarial inputs.
        defensive_margin: mean true-class probability and logit margin, clean and adversarial.
        classification: ``{"clean" | "adversarial": {"per_class": {c: ClassMetrics},
            "macro": ClassMetrics}}``; ``positive_class`` (binary/imbalanced data) picks one out.
        per_sample: one dict per input: ``index``, ``label``, ``clean_pred``, ``adv_pred``,
            ``broken_by`` (``"clean"`` when misclassified already, an attack name, or ``None``),
            ``perturbation_norm`` (of the example that broke it) and ``min_norm`` (``inf`` when
            no adversarial example was found by the minimum-norm attack, ``None`` if not run).
        settings: norm, eps, suite, n, n_classes, seed, batch_size (it fixes the chunks the
            seeds follow), device, processes, time in seconds, model flags.
        losses: ``per_step`` (the loss every step ran with: ``ce``, ``cw``, ``dlr``, ``logit
            differences`` for FAB, ``labels only`` for HopSkipJump), ``used`` (the distinct
            losses) and ``skipped`` (loss -> why: with two classes ``dlr``, constant there).
        attack_classes: the true classes whose points were attacked (None: all); the others
            keep their clean prediction in every attacked figure (``per_sample`` then says
            ``attacked`` per point).
        positive_metrics: with ``positive_class``: its ``clean`` and ``attacked`` ``recall``,
            ``precision``, ``pr_auc`` (average precision) and ``roc_auc``, and ``at_fpr``: the
            operating point (``fpr``, ``threshold``, ``clean_fpr``, ``recall_clean``,
            ``recall_attacked``, ``per_attack``, ``method``). None without a positive class.
        feasibility: with feature constraints (or refused outputs): ``adversarial_points``
            counted, how many are ``feasible`` and their ``feasible_share``, the outputs
            ``refused`` as outside the threat model (per step in ``refused_by_step``), and the
            ``constraints`` set used (its ``describe()``). None otherwise.
        certified: with ``certify``, the sandwich (:mod:`.sandwich`): bound ``method``,
            ``verified_accuracy`` (proven lower bound), ``robust_accuracy`` (the attacks' upper
            bound), ``gap`` and ``decided_by`` (points per side: verified, attack, open,
            misclassified); per point in ``per_sample``: ``certified`` and ``margin_bound``.
        smoothing: with ``smoothing_sigma``, the certificates of the smoothed model (a different
            classifier): ``sigma``, ``n0``, ``n``, ``alpha``, ``certified_accuracy_l2`` per
            radius, ``abstained``; per point ``smoothed_prediction`` and ``smoothed_radius``.
    """

    clean_accuracy: float
    robust_accuracy: float
    per_attack: dict[str, float]
    robustness_score: float
    diagnostics: list[Check]
    escalations: list[Escalation]
    robust_margin: dict[str, Any]
    accuracy_vs_eps: list[tuple[float, float]]
    adversarial_radius: float | None
    radius_threshold: float
    entropy: dict[str, float]
    defensive_margin: dict[str, float]
    classification: dict[str, Any]
    positive_class: int | None
    per_sample: list[dict[str, Any]]
    settings: dict[str, Any]
    #: Up to a few clean/adversarial examples for pictures: x, x_adv, y, clean_pred, adv_pred.
    examples: dict[str, Tensor] = field(default_factory=dict, repr=False)
    losses: dict[str, Any] = field(default_factory=dict)
    attack_classes: list[int] | None = None
    positive_metrics: dict[str, Any] | None = None
    feasibility: dict[str, Any] | None = None
    model_card: dict[str, Any] = field(default_factory=dict)
    certified: dict[str, Any] | None = None
    smoothing: dict[str, Any] | None = None

    # ------------------------------------------------------------------ convenience
    @property
    def triggered(self) -> list[Check]:
        """The diagnostics that fired."""
        return [c for c in self.diagnostics if c.triggered]

    @property
    def masking_suspected(self) -> bool:
        """True when a verdict-level check fired or an escalation lowered robust accuracy."""
        return any(c.triggered and c.severity == VERDICT for c in self.diagnostics) or any(
            e.robust_after < e.robust_before for e in self.escalations
        )

    def summary(self) -> str:
        """One line: clean and robust accuracy, the attacks, and what the diagnostics said."""
        s = self.settings
        verdicts = [c.name for c in self.triggered]
        said = f"; checks fired: {', '.join(verdicts)}" if verdicts else "; no check fired"
        verified = (
            ""
            if self.certified is None
            else f"verified accuracy {self.certified['verified_accuracy']:.2%} "
            f"({self.certified['method']}) <= "
        )
        return (
            f"clean accuracy {self.clean_accuracy:.2%}  {verified}robust accuracy "
            f"{self.robust_accuracy:.2%}  ({s.get('suite')} suite, {s.get('norm')} "
            f"eps={s.get('eps'):g}, n={s.get('n')}, {s.get('seconds', 0):.1f}s){said}"
        )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Every figure as plain JSON-ready values (``inf`` written as ``null``)."""
        data = {k: v for k, v in asdict(self).items() if k != "examples"}
        return {"format_version": REPORT_FORMAT_VERSION, **_jsonable(data)}

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` to ``path`` atomically; returns the path."""
        atomic_write_json(path, self.to_dict())
        return Path(path)

    def to_html(self, path: str | Path) -> Path:
        """Write the self-contained HTML report (:func:`.html.render_html`) to ``path``
        atomically; returns the path."""
        atomic_write_text(path, render_html(self))
        return Path(path)


def report_format_version(data: dict[str, Any]) -> int:
    """The layout version of a report read from JSON: its ``format_version``, 1 without one
    (written before the field existed); a one-line error for a version this reader does not
    know (newer than :data:`REPORT_FORMAT_VERSION`, or not a positive integer)."""
    version = data.get("format_version", 1)
    if type(version) is not int or not 1 <= version <= REPORT_FORMAT_VERSION:
        raise AdvtrainError(
            f"report format_version {version!r} is not one this advtrain reads "
            f"(1 to {REPORT_FORMAT_VERSION}); upgrade advtrain"
        )
    return version


def model_card(
    clean: float,
    robust: float,
    threat: Any,
    *,
    passes_per_prediction: int,
    forward_passes: int,
    unreliable: bool,
    verified_accuracy: float | None = None,
) -> dict[str, Any]:
    """The fields RobustBench's model cards carry (Croce et al. 2021, its ``model_info`` files):
    ``clean_acc`` and ``autoattack_acc`` in percent (here the robust accuracy of the suite run,
    AutoAttack's recipe for ``standard``), ``threat_model`` (``Linf``, ``L2``, ``L1``), ``eps``,
    ``number_forward_passes`` (passes per prediction: 1, or the votes of a randomised model),
    ``unreliable`` (a gradient-masking verdict fired) and, beyond RobustBench,
    ``forward_passes_used``: the inputs the whole evaluation passed through the model, and with
    bound propagation ``verified_acc``, the proven lower bound, in percent."""
    card: dict[str, Any] = {
        "clean_acc": round(100 * clean, 2) if math.isfinite(clean) else None,
        "autoattack_acc": round(100 * robust, 2) if math.isfinite(robust) else None,
        "threat_model": {"linf": "Linf", "l2": "L2", "l1": "L1"}.get(threat.norm, threat.norm),
        "eps": threat.eps,
        "number_forward_passes": passes_per_prediction,
        "forward_passes_used": forward_passes,
        "unreliable": unreliable,
    }
    if verified_accuracy is not None:
        card["verified_acc"] = round(100 * verified_accuracy, 2)
    return card


def robustness_score(clean: float, robust: float) -> float:
    """Harmonic mean of clean and robust accuracy; 0 when both are 0."""
    return 0.0 if clean + robust <= 0 else 2 * clean * robust / (clean + robust)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, Enum):
        return _jsonable(value.value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    return str(value)
