"""The report page's certified section: the sandwich of verified accuracy (a proven lower bound,
bound propagation) and robust accuracy under the attacks (an upper bound), with the points each
side decided; and, apart and labelled as such, randomized smoothing's certified accuracy of the
smoothed model. An empty string when the evaluation certified nothing."""

from __future__ import annotations

from typing import Any

from .html_format import escape, metric, number, percent, table

__all__ = ["certified_section"]

SIDES = (
    ("verified", "verified: proven robust by the bounds"),
    ("attack", "broken by an attack"),
    ("open", "open: neither side decided"),
    ("misclassified", "misclassified clean"),
)


def certified_section(d: dict[str, Any]) -> str:
    """The sandwich table and the smoothed model's table (each only when it was computed)."""
    parts = [_sandwich(d.get("certified")), _smoothing(d.get("smoothing"))]
    body = "".join(p for p in parts if p)
    return f"<h2>Certified robustness</h2>{body}" if body else ""


def _sandwich(certified: dict[str, Any] | None) -> str:
    if not certified:
        return ""
    method = str(certified.get("method"))
    rows = [
        (f"verified accuracy ({method}), lower bound", "verified_accuracy"),
        ("robust accuracy under the attacks, upper bound", "robust_accuracy"),
        ("gap", "gap"),
    ]
    figures = "".join(
        f"<tr><th>{escape(label)}</th>"
        f"{metric(f'certified:{key}', percent(certified.get(key)))}</tr>"
        for label, key in rows
    )
    counts = certified.get("decided_by") or {}
    sides = "".join(
        f"<tr><th>{escape(label)}</th>"
        f"{metric(f'certified:decided_by:{key}', number(counts.get(key)))}</tr>"
        for key, label in SIDES
    )
    return (
        f"<p class='note'>{escape(certified.get('meaning', ''))}.</p>"
        f"<table><tbody>{figures}</tbody></table>" + table(("points decided by", "count"), [sides])
    )


def _smoothing(smoothing: dict[str, Any] | None) -> str:
    if not smoothing:
        return ""
    rows = [
        f"<tr><td class='num'>{escape(radius)}</td>"
        f"{metric(f'smoothing:certified_accuracy_l2:{radius}', percent(accuracy))}</tr>"
        for radius, accuracy in (smoothing.get("certified_accuracy_l2") or {}).items()
    ]
    return (
        f"<h3>Randomized smoothing: {escape(smoothing.get('classifier', ''))}</h3>"
        f"<p class='note'>sigma {escape(number(smoothing.get('sigma')))}, n0 "
        f"{escape(number(smoothing.get('n0')))}, n {escape(number(smoothing.get('n')))}, alpha "
        f"{escape(number(smoothing.get('alpha')))}; abstained on "
        f"{escape(percent(smoothing.get('abstained')))} of the points; no radius above "
        f"{escape(number(smoothing.get('largest_certifiable_radius')))} can be certified with "
        "this n.</p>" + table(("l2 radius", "certified accuracy"), rows)
    )
