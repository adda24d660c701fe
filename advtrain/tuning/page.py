"""The sweep's HTML page: the front as a picture, the recommendations, every trial's settings.

Self-contained: the scatter of clean against robust validation accuracy (every scored trial,
the front joined by a line, the test-split figures of the front beside them) is a PNG drawn with
matplotlib and embedded as base64; everything else is HTML tables with the text escaped.
"""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .sweep import SweepResult, TrialSummary

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2} tr.front td{background:#eef6ff} tr.pick td{background:#e6f7e6}
.muted{color:#777} code{background:#f6f6f6;padding:0 3px}
"""


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}%"


def _esc(value: Any) -> str:
    return html.escape(str(value))


def front_png(result: SweepResult) -> bytes | None:
    """The scatter as PNG bytes, or None when no trial has figures (or matplotlib is missing)."""
    scored = [t for t in result.trials if t.val_clean is not None and t.val_robust is not None]
    if not scored:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib ships with advtrain's dependencies
        return None
    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    try:
        others = [t for t in scored if t.number not in result.front]
        axes.scatter(
            [t.val_clean or 0.0 for t in others],
            [t.val_robust or 0.0 for t in others],
            c="#bbbbbb",
            label="trials (validation)",
        )
        front = sorted((result.trial(n) for n in result.front), key=lambda t: t.val_clean or 0.0)
        axes.plot(
            [t.val_clean or 0.0 for t in front],
            [t.val_robust or 0.0 for t in front],
            "o-",
            c="#1f77b4",
            label="front (validation)",
        )
        tested = [t for t in front if t.test is not None]
        if tested:
            axes.scatter(
                [t.test["clean"] for t in tested if t.test],
                [t.test["robust"] for t in tested if t.test],
                marker="s",
                c="#d62728",
                label=f"front on the test split ({result.suite} suite)",
            )
            for t in tested:
                if t.test:
                    axes.annotate(str(t.number), (t.test["clean"], t.test["robust"]), fontsize=8)
        for t in front:
            axes.annotate(str(t.number), (t.val_clean or 0.0, t.val_robust or 0.0), fontsize=8)
        if result.min_clean is not None:
            axes.axvline(result.min_clean, ls="--", c="#888888", lw=1, label="min clean")
        axes.set_xlabel("clean accuracy")
        axes.set_ylabel("robust accuracy")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        buffer = io.BytesIO()
        figure.tight_layout()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(figure)


def _trial_row(trial: TrialSummary, result: SweepResult) -> str:
    css = "pick" if trial.number == result.pick else "front" if trial.number in result.front else ""
    params = ", ".join(f"{k}={_format(v)}" for k, v in trial.params.items())
    test = trial.test or {}
    cells = [
        _esc(trial.number),
        _esc(trial.state.lower() + (f" (epoch {trial.pruned_at})" if trial.pruned_at else "")),
        _esc(params),
        _pct(trial.val_clean),
        _pct(trial.val_robust),
        _pct(test.get("clean")),
        _pct(test.get("robust")) + (" masking!" if test.get("masking") else ""),
        "" if trial.seconds is None else f"{trial.seconds:.0f}s",
        f"<code>{_esc(trial.run_dir or '')}</code>",
        _esc(trial.error or ""),
    ]
    return f"<tr class='{css}'>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_sweep(result: SweepResult) -> str:
    """The page as one HTML string."""
    png = front_png(result)
    picture = (
        f"<img alt='clean against robust accuracy' src='data:image/png;base64,"
        f"{base64.b64encode(png).decode('ascii')}'>"
        if png
        else "<p class='muted'>No trial has figures yet.</p>"
    )
    counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(result.counts().items()))
    objective = (
        "two objectives: clean and robust validation accuracy (Pareto front)"
        if len(result.objectives) > 1
        else "one objective: robust validation accuracy"
    )
    if result.min_clean is not None:
        objective += f"; constraint clean >= {_pct(result.min_clean)}"
    recommended = _recommended(result)
    rows = "".join(_trial_row(t, result) for t in sorted(result.trials, key=lambda t: t.number))
    space = "".join(
        f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in result.space["params"].items()
    )
    note = f"<p><b>Note:</b> {_esc(result.note)}</p>" if result.note else ""
    return f"""<!doctype html><html><head><meta charset='utf-8'><title>advtrain sweep</title>
<style>{_STYLE}</style></head><body>
<h1>Sweep {_esc(result.study)}</h1>
<p>{_esc(objective)}. Robust accuracy at eps {_esc(result.eval_eps or "(dataset default)")}.
Trials: {_esc(counts)}. Storage <code>{_esc(result.storage)}</code>.</p>
{note}
<h2>Front</h2>{picture}
<h2>Recommended configurations</h2>{recommended}
<h2>Search space</h2><table><tr><th>setting</th><th>searched over</th></tr>{space}</table>
<h2>Trials</h2>
<table><tr><th>#</th><th>state</th><th>settings</th><th>val clean</th><th>val robust</th>
<th>test clean</th><th>test robust</th><th>time</th><th>run directory</th><th>error</th></tr>
{rows}</table>
<p class='muted'>Blue rows: the validation front; green: the pick. Test figures: the
{_esc(result.suite or "(not run)")} suite on the test split.</p>
</body></html>
"""


def _recommended(result: SweepResult) -> str:
    if not result.test_front:
        return "<p class='muted'>The front has not been measured on the test split.</p>"
    items = []
    for number in result.test_front:
        trial = result.trial(number)
        test = trial.test or {}
        mark = " <b>(the pick)</b>" if number == result.pick else ""
        settings = ", ".join(f"{k} = {_format(v)}" for k, v in trial.params.items())
        items.append(
            f"<li>trial {number}{mark}: test clean {_pct(test.get('clean'))}, robust "
            f"{_pct(test.get('robust'))}; <code>{_esc(settings)}</code>; "
            f"<code>advtrain evaluate {_esc(trial.run_dir or '')}</code></li>"
        )
    return "<ul>" + "".join(items) + "</ul>"
