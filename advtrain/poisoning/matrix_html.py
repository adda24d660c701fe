"""The matrix as one self-contained HTML page: settings, the clean baseline, one row per
attack x defence with C-Acc, ASR, R-Acc and detection precision/recall (each figure in an
element tagged ``data-metric="attack/defence/field"``, as the evaluation report tags its
own), and the triggers with their pictures."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..evaluation.html_format import escape, metric, number, percent, table

if TYPE_CHECKING:
    from .matrix import Matrix

#: The cell fields shown, with their headers and how each is written.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("clean_accuracy", "C-Acc", "percent"),
    ("attack_success_rate", "ASR", "percent"),
    ("robust_accuracy", "R-Acc", "percent"),
    ("detection_precision", "Detection precision", "percent"),
    ("detection_recall", "Detection recall", "percent"),
    ("flagged", "Flagged", "number"),
    ("poisoned", "Poisoned", "number"),
    ("seconds", "Seconds", "number"),
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.none td { background: #fff4f0; }
.note { color: #666; font-size: 0.9em; }
figure { display: inline-block; margin: 0 2em 1em 0; }
"""


def format_value(value: Any, how: str) -> str:
    """A figure as the page writes it (percent for fractions, else :func:`number`)."""
    return percent(value) if how == "percent" else number(value)


def render_matrix(matrix: Matrix) -> str:
    rows = []
    for cell in matrix.cells:
        key = f"{cell.attack}/{cell.defence}"
        figures = "".join(
            metric(f"{key}/{name}", format_value(getattr(cell, name), how))
            for name, _, how in COLUMNS
        )
        css = ' class="none"' if cell.defence == "none" else ""
        rows.append(
            f"<tr{css}><td>{escape(cell.attack)}</td><td>{escape(cell.defence)}</td>{figures}"
            f'<td class="note">{escape(cell.note)}</td></tr>'
        )
    header = ["Attack", "Defence", *(h for _, h, _ in COLUMNS), "Note"]
    base = matrix.baseline
    baseline_rows = [
        "<tr><td>clean model</td>"
        + metric("baseline/clean_accuracy", percent(base["clean_accuracy"]))
        + "</tr>"
    ]
    for name, asr in base.get("attack_success_rate", {}).items():
        baseline_rows.append(
            f"<tr><td>{escape(name)} trigger on the clean model (ASR)</td>"
            + metric(f"baseline/{name}/attack_success_rate", percent(asr))
            + "</tr>"
        )
    triggers = []
    for name, trig in matrix.triggers.items():
        details = {k: v for k, v in trig.items() if k != "picture"}
        text = escape(", ".join(f"{k}: {number(v)}" for k, v in details.items()))
        picture = trig.get("picture")
        image = f'<img src="{picture}" alt="{escape(name)} trigger">' if picture else ""
        caption = "clean test image, triggered" + (
            ", a poisoned training image" if trig.get("labels") == "clean" and picture else ""
        )
        triggers.append(
            f"<figure>{image}<figcaption><b>{escape(name)}</b> ({escape(caption)})<br>"
            f"{text}</figcaption></figure>"
            if picture
            else f"<p><b>{escape(name)}</b>: {text}</p>"
        )
    settings = escape(", ".join(f"{k}={number(v)}" for k, v in matrix.settings.items()))
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>Backdoor matrix: {escape(matrix.dataset)}</title><style>{STYLE}</style>"
        "</head><body>"
        f"<h1>Backdoor attacks x defences on {escape(matrix.dataset)} ({escape(matrix.model)})</h1>"
        f"<p>Poisoning rate {metric('rate', number(matrix.rate), 'span', '')}, target class "
        f"{metric('target', number(matrix.target), 'span', '')}, "
        f"{metric('n_train', number(matrix.n_train), 'span', '')} training rows, "
        f"{metric('n_test', number(matrix.n_test), 'span', '')} test rows; "
        f"{metric('seconds', number(matrix.seconds), 'span', '')} s in all.</p>"
        "<p class='note'>C-Acc: clean test accuracy. ASR: test inputs not of the target class, "
        "triggered, classified as the target. R-Acc: the same inputs classified as their true "
        "label. Detection: rows flagged against the rows poisoned (spectral, ac: training "
        "rows removed before retraining; strip: test inputs rejected).</p>"
        "<h2>Clean baseline</h2>"
        + table(["", "Figure"], baseline_rows)
        + "<h2>Attacks x defences</h2>"
        + table(header, rows, "matrix")
        + "<h2>Triggers</h2>"
        + "".join(triggers)
        + f"<h2>Settings</h2><p class='note'>{settings}</p></body></html>"
    )
