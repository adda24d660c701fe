"""The evaluation report as one self-contained HTML page.

Figures come from the report's ``to_dict`` (:class:`~advtrain.evaluation.report.Report`), so
the page shows exactly what the JSON file holds; each one sits in an element with a stable
``data-metric`` attribute (``clean_accuracy``, ``per_attack:<name>``, ``diagnostic:<name>``,
...), which lets tools and tests read the page.
Accuracies and other fractions are shown as percentages with 2 decimals, other floats with 4
significant digits, and ``None``/``inf`` as a dash. Pictures are PNGs drawn with matplotlib's
Agg canvas and inlined as ``data:`` URIs: the page loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import io
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from .findings import VERDICT
from .html_certified import certified_section as _certified
from .html_format import DASH, number, percent
from .html_format import escape as _e
from .html_format import metric as _metric
from .html_format import table as _table
from .html_tabular import feasibility_line as _feasibility
from .html_tabular import losses_note as _losses
from .html_tabular import positive_section as _positive

__all__ = ["DASH", "number", "percent", "render_html"]

#: Settings shown in the summary table; the rest go to the "all settings" table.
SUMMARY_SETTINGS = ("norm", "eps", "suite", "n", "seconds")
SIDES = {"clean": "clean", "adversarial": "adversarial", "adv": "adversarial"}


class Renderable(Protocol):
    """What the page needs of a :class:`~advtrain.evaluation.report.Report` (named by its
    methods, so this module does not import the report's, which imports it for ``to_html``)."""

    examples: dict[str, Any]

    def to_dict(self) -> dict[str, Any]: ...

    @property
    def masking_suspected(self) -> bool: ...


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       background: #f6f7f9; margin: 0; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #e3e5e8; }
h3 { font-size: 15px; margin: 16px 0 6px; }
p.note { color: #555; margin: 4px 0 10px; }
.banner { padding: 10px 14px; border-radius: 6px; margin: 14px 0; font-weight: 600; }
.banner.bad { background: #fde8e6; color: #8e1f14; border: 1px solid #f3b8b1; }
.banner.good { background: #e6f5ea; color: #185c2b; border: 1px solid #b5dec1; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 14px; }
th, td { padding: 5px 12px; border-bottom: 1px solid #e3e5e8; text-align: left;
         vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.positive td { background: #fff6d6; font-weight: 600; }
tr.macro td { border-top: 2px solid #c9ccd1; font-weight: 600; }
tr.triggered.verdict td { background: #fde8e6; }
tr.triggered.warning td { background: #fff3d9; }
.tag { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
       font-weight: 600; }
.tag.triggered { background: #c0392b; color: #fff; }
.tag.ok { background: #dff0e3; color: #185c2b; }
.evidence { color: #555; font-size: 12px; margin-top: 3px; word-break: break-word; }
.down { color: #c0392b; }
.bar { background: #dfe7f3; height: 8px; border-radius: 4px; min-width: 120px; }
.bar > div { background: #3d6fb6; height: 8px; border-radius: 4px; }
.side { display: flex; flex-wrap: wrap; gap: 28px; }
figure { margin: 8px 0 16px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e5e8; }
figcaption { color: #555; font-size: 13px; }
details { margin: 4px 0 12px; }
summary { cursor: pointer; color: #3d6fb6; }
"""


# --------------------------------------------------------------------------- formatting


# --------------------------------------------------------------------------- pictures


def _png(figure: Any) -> str:
    """A matplotlib ``Figure`` as a base64 PNG data URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(uri: str, alt: str, caption: str) -> str:
    return (
        f'<figure><img src="{uri}" alt="{_e(alt)}"><figcaption>{_e(caption)}</figcaption></figure>'
    )


def _curve_png(
    curve: list[list[float]],
    clean: float | None,
    threshold: float | None,
    eps: float | None,
    radius: float | None,
) -> str:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 3.8))
    ax = figure.subplots()
    xs = [p[0] for p in curve]
    ys = [100 * p[1] for p in curve]
    ax.plot(xs, ys, marker="o", markersize=3.5, color="#3d6fb6", label="robust accuracy")
    if isinstance(clean, (int, float)):
        ax.axhline(100 * clean, color="#888", linestyle=":", linewidth=1, label="clean accuracy")
        if isinstance(threshold, (int, float)):
            ax.axhline(
                100 * clean * threshold,
                color="#d68910",
                linestyle="--",
                linewidth=1,
                label=f"{threshold:g} \u00d7 clean",
            )
    if isinstance(eps, (int, float)):
        ax.axvline(eps, color="#c0392b", linestyle="--", linewidth=1, label=f"eps = {eps:.4g}")
    at_radius = None if radius is None else {p[0]: p[1] for p in curve}.get(radius)
    if radius is not None and at_radius is not None:
        ax.plot(
            [radius],
            [100 * at_radius],
            "D",
            color="#d68910",
            markersize=7,
            label=f"radius = {radius:.4g}",
        )
    ax.set_xlabel("eps")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    return _png(figure)


def _histogram_png(edges: Sequence[float], counts: Sequence[float], eps: float | None) -> str:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 3.4))
    ax = figure.subplots()
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(
        list(edges[:-1]),
        list(counts),
        width=widths,
        align="edge",
        color="#3d6fb6",
        edgecolor="white",
        linewidth=0.6,
    )
    if isinstance(eps, (int, float)):
        ax.axvline(eps, color="#c0392b", linestyle="--", linewidth=1, label=f"eps = {eps:.4g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("minimum adversarial perturbation norm")
    ax.set_ylabel("points")
    ax.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return _png(figure)


def _examples_png(examples: dict[str, Any]) -> str:
    """The clean/perturbation/adversarial grid of :func:`advtrain.visualize.adversarial_grid`."""
    from ..visualize import adversarial_grid

    with tempfile.TemporaryDirectory() as folder:
        path = adversarial_grid(
            examples["x"],
            examples["x_adv"],
            examples["y"],
            examples["clean_pred"],
            examples["adv_pred"],
            Path(folder) / "examples.png",
            rows=8,
        )
        data = path.read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------- sections


def _summary(d: dict[str, Any], report: Renderable) -> str:
    settings = d.get("settings") or {}
    rows = [
        ("clean accuracy", _metric("clean_accuracy", percent(d.get("clean_accuracy")))),
        ("robust accuracy", _metric("robust_accuracy", percent(d.get("robust_accuracy")))),
        (
            "robustness score (harmonic mean)",
            _metric("robustness_score", percent(d.get("robustness_score"))),
        ),
        ("adversarial radius", _metric("adversarial_radius", number(d.get("adversarial_radius")))),
        (
            "radius threshold (\u00d7 clean accuracy)",
            _metric("radius_threshold", number(d.get("radius_threshold"))),
        ),
        (
            "median robust margin",
            _metric("robust_margin_median", number((d.get("robust_margin") or {}).get("median"))),
        ),
    ]
    rows += [
        (key, _metric(f"settings:{key}", number(settings.get(key)))) for key in SUMMARY_SETTINGS
    ]
    if d.get("positive_class") is not None:
        rows.append(("positive class", _metric("positive_class", number(d["positive_class"]))))
    if d.get("attack_classes") is not None:
        classes = ", ".join(str(c) for c in d["attack_classes"])
        rows.append(("attacked classes", _metric("attack_classes", classes)))
    if report.masking_suspected:
        banner = (
            '<div class="banner bad">Gradient masking suspected: a verdict-level check '
            "fired or an escalation lowered robust accuracy. Treat the robust accuracy "
            "as an upper bound.</div>"
        )
    else:
        banner = '<div class="banner good">No sign of gradient masking.</div>'
    body = "".join(f"<tr><th>{_e(k)}</th>{v}</tr>" for k, v in rows)
    others = [k for k in settings if k not in SUMMARY_SETTINGS]
    rest = ""
    if others:
        rest = (
            "<details><summary>all settings</summary>"
            + _table(
                ("setting", "value"),
                (
                    f"<tr><th>{_e(k)}</th>"
                    f"{_metric(f'settings:{k}', number(settings[k]), css='')}</tr>"
                    for k in others
                ),
            )
            + "</details>"
        )
    return f"<h2>Summary</h2>{banner}<table><tbody>{body}</tbody></table>{rest}"


def _attacks(d: dict[str, Any]) -> str:
    per_attack = d.get("per_attack") or {}
    if not per_attack:
        return "<h2>Attacks</h2><p class='note'>No attack was run.</p>"
    losses = d.get("losses") or {}
    per_step = losses.get("per_step") or {}
    rows, previous = [], d.get("clean_accuracy")
    for name, value in per_attack.items():
        drop = ""
        if isinstance(value, (int, float)) and isinstance(previous, (int, float)):
            pp = 100 * (previous - value)
            drop = f'<span class="down">\u2212{pp:.2f} pp</span>' if pp > 0 else "0"
        width = max(0.0, min(100.0, 100 * value)) if isinstance(value, (int, float)) else 0
        loss = (
            _metric(f"loss:{name}", number(per_step[name]), css="")
            if name in per_step
            else "<td></td>"
        )
        rows.append(
            f"<tr><td>{_e(name)}</td>{_metric(f'per_attack:{name}', percent(value))}"
            f'<td class="num">{drop}</td>{loss}'
            f'<td><div class="bar"><div style="width:{width:.1f}%"></div></div></td></tr>'
        )
        previous = value
    broken: dict[str, int] = {}
    for sample in d.get("per_sample") or []:
        key = sample.get("broken_by")
        key = "standing" if key is None else str(key)
        broken[key] = broken.get(key, 0) + 1
    fell = ""
    if broken:
        fell = "<h3>What broke each point</h3>" + _table(
            ("broken by", "points"),
            (
                f"<tr><td>{_e(k)}</td>{_metric(f'broken_by:{k}', str(v))}</tr>"
                for k, v in broken.items()
            ),
        )
    return (
        "<h2>Attacks</h2><p class='note'>Robust accuracy after each attack of the cascade, "
        "in the order run (each counts the points still standing after it and all before "
        "it).</p>"
        + (
            f"<p class='note'><b>{_e(str(d['settings']['note']))}</b></p>"
            if d.get("settings", {}).get("note")
            else ""
        )
        + _table(("attack", "robust accuracy", "drop", "loss", ""), rows)
        + _losses(losses)
        + fell
    )


def _escalations(d: dict[str, Any]) -> str:
    escalations = d.get("escalations") or []
    if not escalations:
        return (
            "<h2>Escalations</h2><p class='note'>None: no check called for a stronger attack.</p>"
        )
    rows = []
    for i, e in enumerate(escalations):
        before, after = e.get("robust_before"), e.get("robust_after")
        lowered = (
            isinstance(before, (int, float)) and isinstance(after, (int, float)) and after < before
        )
        rows.append(
            f"<tr><td>{_e(e.get('reason'))}</td><td>{_e(e.get('action'))}</td>"
            f"{_metric(f'escalation:{i}:robust_before', percent(before))}"
            f'<td class="num">\u2192</td>'
            + _metric(
                f"escalation:{i}:robust_after", percent(after), css="num down" if lowered else "num"
            )
            + "</tr>"
        )
    return (
        "<h2>Escalations</h2><p class='note'>Stronger attacks run because a check fired.</p>"
        + _table(("reason", "action", "robust before", "", "robust after"), rows)
    )


def _diagnostics(d: dict[str, Any]) -> str:
    checks = d.get("diagnostics") or []
    if not checks:
        return "<h2>Diagnostics</h2><p class='note'>No diagnostic was run.</p>" + _feasibility(d)
    rows = []
    for c in checks:
        name, fired = str(c.get("name")), bool(c.get("triggered"))
        severity = str(c.get("severity"))
        state = "triggered" if fired else "ok"
        evidence = "".join(
            f'{_e(k)} = <span data-metric="{_e(f"evidence:{name}:{k}")}">{_e(number(v))}</span>; '
            for k, v in (c.get("evidence") or {}).items()
        )
        evidence = f'<div class="evidence">{evidence.rstrip("; ")}</div>' if evidence else ""
        css = f"triggered {'verdict' if severity == VERDICT else 'warning'}" if fired else ""
        rows.append(
            f'<tr class="{css}"><td>{_e(name)}</td><td>{_e(severity)}</td>'
            f'<td><span class="tag {state}" data-metric="{_e(f"diagnostic:{name}")}">'
            f"{state}</span></td><td>{_e(c.get('detail'))}{evidence}</td></tr>"
        )
    return (
        "<h2>Gradient-masking diagnostics and attack self-test</h2><p class='note'>A "
        "<b>verdict</b> fires only when the evaluation is provably incomplete; a <b>warning</b> "
        "can fire on an honest model and calls for a closer look. The binarization self-test "
        "(when run) plants an adversarial example inside the eps-ball and checks that the "
        "attacks find it.</p>"
        + _table(("check", "severity", "verdict", "detail"), rows)
        + _feasibility(d)
    )


def _curve(d: dict[str, Any]) -> str:
    curve = [
        p
        for p in d.get("accuracy_vs_eps") or []
        if len(p) == 2 and all(isinstance(v, (int, float)) for v in p)
    ]
    head = "<h2>Accuracy versus eps</h2>"
    if not curve:
        return head + "<p class='note'>No accuracy-versus-eps curve.</p>"
    settings = d.get("settings") or {}
    uri = _curve_png(
        curve,
        d.get("clean_accuracy"),
        d.get("radius_threshold"),
        settings.get("eps"),
        d.get("adversarial_radius"),
    )
    rows = (
        f"<tr>{_metric(f'accuracy_vs_eps:{i}:eps', number(eps))}"
        f"{_metric(f'accuracy_vs_eps:{i}:accuracy', percent(acc))}</tr>"
        for i, (eps, acc) in enumerate(d.get("accuracy_vs_eps") or [])
    )
    return (
        head
        + _img(
            uri,
            "accuracy versus eps",
            "Accuracy at each radius, from the minimum-norm results and the attacks at fixed eps.",
        )
        + "<details><summary>curve points</summary>"
        + _table(("eps", "accuracy"), rows)
        + "</details>"
    )


def _margin(d: dict[str, Any]) -> str:
    margin = d.get("robust_margin") or {}
    stats = [
        f"<tr><th>{_e(k)}</th>"
        + _metric(f"robust_margin_{k}", percent(v) if k == "found" else number(v))
        + "</tr>"
        for k, v in margin.items()
        if k not in ("histogram", "median")
    ]
    head = (
        "<h2>Robust margin</h2><p class='note'>Smallest perturbation norm that changes the "
        "prediction of each clean-correct point (median in the summary; <i>found</i>: "
        "fraction with one found).</p>"
    )
    table = f"<table><tbody>{''.join(stats)}</tbody></table>" if stats else ""
    eps = (d.get("settings") or {}).get("eps")
    histogram = margin.get("histogram") or {}
    edges, counts = histogram.get("edges") or [], histogram.get("counts") or []
    if counts and len(edges) == len(counts) + 1:
        return (
            head
            + table
            + _img(
                _histogram_png(edges, counts, eps),
                "robust-margin histogram",
                "Histogram of the finite minimum-norm perturbations.",
            )
        )
    values = [s.get("min_norm") for s in d.get("per_sample") or [] if s.get("broken_by") != "clean"]
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return head + table + "<p class='note'>No minimum-norm results.</p>"
    import numpy as np

    counts_, edges_ = np.histogram(values, bins=min(20, max(5, len(values) // 2)))
    return (
        head
        + table
        + _img(
            _histogram_png(edges_.tolist(), counts_.tolist(), eps),
            "robust-margin histogram",
            "Histogram of the finite per-sample minimum-norm perturbations.",
        )
    )


def _split(key: str) -> tuple[str, str] | None:
    """``"clean_probability"`` -> ``("clean", "probability")``; None when no side is named."""
    parts = key.split("_")
    for index in (0, -1):
        if parts[index] in SIDES:
            rest = parts[1:] if index == 0 else parts[:-1]
            return SIDES[parts[index]], " ".join(rest)
    return None


def _confidence(d: dict[str, Any]) -> str:
    rows = []
    for group, label in (("entropy", "entropy (nats)"), ("defensive_margin", "")):
        values = d.get(group) or {}
        pairs: dict[str, dict[str, str]] = {}
        for key, value in values.items():
            side = _split(key)
            if side is None:
                rows.append(
                    f"<tr><td>{_e(f'{group} {key}')}</td>"
                    + _metric(f"{group}:{key}", number(value))
                    + "<td></td></tr>"
                )
                continue
            name = side[1] or label or group
            pairs.setdefault(name, {})[side[0]] = _metric(f"{group}:{key}", number(value))
        for name, cells in pairs.items():
            rows.append(
                f"<tr><td>{_e(name.replace('_', ' '))}</td>"
                + cells.get("clean", "<td></td>")
                + cells.get("adversarial", "<td></td>")
                + "</tr>"
            )
    if not rows:
        return ""
    return (
        "<h2>Entropy and defensive margin</h2><p class='note'>Mean predictive entropy, "
        "true-class probability and logit margin, on clean and adversarial inputs.</p>"
        + _table(("quantity", "clean", "adversarial"), rows)
    )


def _classification(d: dict[str, Any]) -> str:
    classification = d.get("classification") or {}
    positive = d.get("positive_class")
    tables = []
    for side in ("clean", "adversarial"):
        block = classification.get(side) or {}
        entries = [
            (str(c), m, str(c) == str(positive)) for c, m in (block.get("per_class") or {}).items()
        ]
        if block.get("macro"):
            entries.append(("macro", block["macro"], False))
        if not entries:
            continue
        rows = []
        for c, m, is_positive in entries:
            css = "positive" if is_positive else "macro" if c == "macro" else ""
            mark = " (positive)" if is_positive else ""
            rows.append(
                f'<tr class="{css}"><td>{_e(c + mark)}</td>'
                + "".join(
                    _metric(f"classification:{side}:{c}:{k}", number((m or {}).get(k)))
                    for k in ("precision", "recall", "f1", "support")
                )
                + "</tr>"
            )
        tables.append(
            f"<div><h3>{_e(side)}</h3>"
            + _table(("class", "precision", "recall", "F1", "support"), rows)
            + "</div>"
        )
    if not tables:
        return ""
    return (
        "<h2>Per-class precision, recall and F1</h2><div class='side'>" + "".join(tables) + "</div>"
    )


def _examples(report: Renderable) -> str:
    examples = report.examples or {}
    keys = ("x", "x_adv", "y", "clean_pred", "adv_pred")
    if not all(k in examples and examples[k] is not None for k in keys) or len(examples["x"]) == 0:
        return ""
    head = "<h2>Adversarial examples</h2>"
    try:
        uri = _examples_png(examples)
    except Exception as exc:  # a picture must never cost the whole report
        return head + f"<p class='note'>Could not draw the examples: {_e(exc)}</p>"
    tabular = getattr(examples["x"], "ndim", 0) == 2
    caption = (
        "Perturbation x_adv \u2212 x by feature (blue negative, red positive); rows "
        "labelled with label and predictions (red: wrong)."
        if tabular
        else "Clean input, perturbation (grey is 0) and adversarial input; predictions in red "
        "when wrong."
    )
    return head + _img(uri, "adversarial examples", caption)


# --------------------------------------------------------------------------- page


def render_html(report: Renderable) -> str:
    """The whole report as one self-contained HTML5 page (no external resources)."""
    d = report.to_dict()
    settings = d.get("settings") or {}
    subtitle = ", ".join(f"{k} {number(settings[k])}" for k in SUMMARY_SETTINGS if k in settings)
    sections = (
        _summary(d, report),
        _attacks(d),
        _escalations(d),
        _diagnostics(d),
        _certified(d),
        _curve(d),
        _margin(d),
        _confidence(d),
        _classification(d),
        _positive(d),
        _examples(report),
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>advtrain evaluation report</title>"
        f"<style>{CSS}</style></head><body><main>"
        f"<h1>Robustness evaluation</h1><p class='note'>{_e(subtitle)}</p>"
        + "".join(sections)
        + "</main></body></html>\n"
    )
