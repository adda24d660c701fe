"""How the report's page writes figures: percentages, numbers, escaped text, tagged cells.

Accuracies and other fractions are shown as percentages with 2 decimals, other floats with 4
significant digits, and ``None``/``inf`` as a dash. Each figure sits in an element with a stable
``data-metric`` attribute (:func:`metric`), which lets tools and tests read the page.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["DASH", "escape", "metric", "number", "percent", "table"]

DASH = "\u2014"


def percent(value: Any) -> str:
    """A fraction as a percentage with 2 decimals (``0.975`` -> ``97.50%``); dash if missing."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return DASH
    return f"{value:.2%}"


def number(value: Any) -> str:
    """Floats with 4 significant digits, integers and strings as they are, anything else as
    compact JSON; ``None`` and non-finite floats as a dash."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, ".4g") if math.isfinite(value) else DASH
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def metric(key: str, text: str, tag: str = "td", css: str = "num") -> str:
    """One element holding one figure, tagged ``data-metric="key"``."""
    klass = f' class="{css}"' if css else ""
    return f'<{tag}{klass} data-metric="{escape(key)}">{escape(text)}</{tag}>'


def table(header: Sequence[str], rows: Iterable[str], css: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    klass = f' class="{css}"' if css else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
