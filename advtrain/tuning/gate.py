"""A robustness gate: a new evaluation report against a baseline, under the same threat model.

``gate(new, baseline)`` compares two reports (the dicts of their JSON files) and returns a
:class:`Verdict`: it holds, or it names each regression: clean or robust accuracy dropped by
more than ``max_drop`` (absolute, in accuracy units), clean or robust accuracy below a required
floor, or a gradient-masking verdict in the new report (a robust figure that cannot be trusted;
allowed only on request). Reports measured under different conditions are refused, naming the
first difference: the norm, eps, suite, number of points, dataset, classes attacked, or the
positive class. Comparing figures measured differently would let a weaker suite or a smaller
eps pass for an improvement.

``read_report`` reads a report JSON of any layout version up to the current one
(:func:`advtrain.evaluation.report.report_format_version`; reports without the field are
version 1). :func:`advtrain.tuning.evaluate_front.evaluate_like` re-measures a run directory
as a baseline was measured, so that the two reports differ only by the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdvtrainError
from ..evaluation.findings import VERDICT
from ..evaluation.report import report_format_version

#: The settings two reports must share to be compared, in the order differences are named.
SAME_SETTINGS = ("norm", "eps", "suite", "n", "dataset", "n_classes")
#: Report fields (outside the settings) that must agree too.
SAME_FIELDS = ("attack_classes", "positive_class")
#: Tolerance on eps and accuracies read back from JSON.
TOLERANCE = 1e-9


def read_report(path: str | Path) -> dict[str, Any]:
    """The report JSON at ``path``, checked: a one-line error for a missing or unreadable file,
    invalid JSON, a version this advtrain does not read, or missing figures."""
    path = Path(path)
    if not path.is_file():
        raise AdvtrainError(f"report '{path}' does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise AdvtrainError(f"report '{path}' is not valid JSON") from None
    if not isinstance(data, dict):
        raise AdvtrainError(f"report '{path}' does not hold a JSON object")
    try:
        report_format_version(data)
    except AdvtrainError as exc:
        raise AdvtrainError(f"report '{path}': {exc}") from None
    for key in ("clean_accuracy", "robust_accuracy"):
        value = data.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise AdvtrainError(f"report '{path}' has no {key} in [0, 1] (got {value!r})")
    settings = data.get("settings")
    if not isinstance(settings, dict) or not {"norm", "eps", "suite"} <= set(settings):
        raise AdvtrainError(f"report '{path}' has no settings with norm, eps and suite")
    return data


def masking_findings(report: dict[str, Any]) -> list[str]:
    """What in ``report`` says its robust figure cannot be trusted: each verdict-level check
    that fired, each escalation that lowered robust accuracy, or the model card's
    ``unreliable`` flag (the same rule as :attr:`advtrain.evaluation.Report.masking_suspected`)."""
    found = [
        f"check '{c.get('name')}' fired ({c.get('detail', '')})".replace(" ()", "")
        for c in report.get("diagnostics") or []
        if isinstance(c, dict) and c.get("triggered") and c.get("severity") == VERDICT
    ]
    for e in report.get("escalations") or []:
        if isinstance(e, dict) and _lowered(e):
            found.append(
                f"escalation '{e.get('action')}' lowered robust accuracy "
                f"{e['robust_before']:.2%} -> {e['robust_after']:.2%}"
            )
    card = report.get("model_card") or {}
    if not found and isinstance(card, dict) and card.get("unreliable"):
        found.append("the model card marks the figure unreliable")
    return found


def _lowered(escalation: dict[str, Any]) -> bool:
    before, after = escalation.get("robust_before"), escalation.get("robust_after")
    return isinstance(before, (int, float)) and isinstance(after, (int, float)) and after < before


def differences(new: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """Each setting that makes the two reports incomparable, as ``name X here, Y in baseline``
    (a setting one report lacks, as a version-1 report may, is not held against it)."""
    found = []
    new_s, base_s = new.get("settings", {}), baseline.get("settings", {})
    for key in SAME_SETTINGS:
        if key in new_s and key in base_s and not _same(new_s[key], base_s[key]):
            found.append(f"{key} {new_s[key]!r} here, {base_s[key]!r} in the baseline")
    for key in SAME_FIELDS:
        if key in new and key in baseline and not _same(new[key], baseline[key]):
            found.append(f"{key} {new[key]!r} here, {baseline[key]!r} in the baseline")
    return found


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= TOLERANCE * max(1.0, abs(float(b)))
    return bool(a == b)


def check_comparable(new: dict[str, Any], baseline: dict[str, Any]) -> None:
    """A one-line error naming the differences when the reports were measured differently."""
    found = differences(new, baseline)
    if found:
        raise AdvtrainError(
            "cannot compare with the baseline, measured under another threat model or suite: "
            + "; ".join(found)
        )


@dataclass
class Verdict:
    """What :func:`gate` decided: ``holds``, the ``failures`` (each names what regressed and
    by how much) and ``notes`` (what is worth saying but fails nothing)."""

    holds: bool
    failures: list[str]
    notes: list[str]
    new: dict[str, Any]
    baseline: dict[str, Any]
    limits: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The verdict as a few lines of plain text (one screen)."""
        n, b = self.new, self.baseline
        head = "HOLDS" if self.holds else "REGRESSED"
        out = [
            f"robustness gate: {head}",
            f"  threat model  {n['norm']} eps={n['eps']:g}, {n['suite']} suite, "
            f"n={n.get('n')}, {n.get('dataset') or 'dataset unnamed'}",
            f"  {'':14}{'new':>9}{'baseline':>10}{'change':>9}",
        ]
        for key in ("clean", "robust"):
            change = 100 * (n[key] - b[key])
            out.append(f"  {key + ' accuracy':14}{n[key]:>9.2%}{b[key]:>10.2%}{change:>+8.2f}pt")
        limits = ", ".join(f"{k} {v}" for k, v in self.limits.items() if v is not None)
        out.append(f"  limits        {limits}")
        out += [f"  FAIL  {line}" for line in self.failures]
        out += [f"  note  {line}" for line in self.notes]
        return out


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    s = report.get("settings", {})
    return {
        "clean": float(report["clean_accuracy"]),
        "robust": float(report["robust_accuracy"]),
        "norm": s.get("norm"),
        "eps": float(s.get("eps", float("nan"))),
        "suite": s.get("suite"),
        "n": s.get("n"),
        "dataset": s.get("dataset"),
        "format_version": report_format_version(report),
    }


def gate(
    new: dict[str, Any],
    baseline: dict[str, Any],
    *,
    max_drop: float = 0.01,
    require_clean: float | None = None,
    require_robust: float | None = None,
    allow_masking: bool = False,
) -> Verdict:
    """Whether ``new`` holds against ``baseline`` (both report dicts, measured alike: else a
    one-line error, see :func:`check_comparable`); see the module docstring for the rules."""
    for name, value in (
        ("max_drop", max_drop),
        ("require_clean", require_clean),
        ("require_robust", require_robust),
    ):
        if value is not None and (
            not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1
        ):
            raise AdvtrainError(f"{name} must be an accuracy in [0, 1], got {value!r}")
    check_comparable(new, baseline)
    n, b = _figures(new), _figures(baseline)
    failures: list[str] = []
    notes: list[str] = []
    for key in ("clean", "robust"):
        drop = b[key] - n[key]
        if drop > max_drop + TOLERANCE:
            failures.append(
                f"{key} accuracy dropped by {100 * drop:.2f} points "
                f"({b[key]:.2%} -> {n[key]:.2%}), more than --max-drop {100 * max_drop:.2f}"
            )
    for key, floor in (("clean", require_clean), ("robust", require_robust)):
        if floor is not None and n[key] < floor - TOLERANCE:
            failures.append(f"{key} accuracy {n[key]:.2%} is below the required {floor:.2%}")
    masking = masking_findings(new)
    if masking and not allow_masking:
        failures += [f"gradient masking suspected: {line}" for line in masking]
    elif masking:
        notes += [f"gradient masking suspected (allowed): {line}" for line in masking]
    if masking_findings(baseline):
        notes.append("the baseline itself has a masking verdict: its robust figure is suspect")
    if b["format_version"] < n["format_version"]:
        notes.append(f"baseline report format version {b['format_version']} (read as such)")
    limits = {
        "max-drop": max_drop,
        "require-clean": require_clean,
        "require-robust": require_robust,
        "masking": "allowed" if allow_masking else "fails",
    }
    return Verdict(not failures, failures, notes, n, b, limits)
