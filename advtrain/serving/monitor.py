"""``advtrain monitor URL``: poll a service's ``/metrics`` and show the live figures.

Each poll reads the Prometheus text with ``prometheus_client``'s own parser and shows: requests
by status and their rate since the last poll, the p50/p99 latency of ``/predict`` (from the
histogram's buckets, linearly interpolated as Prometheus' ``histogram_quantile`` does), inputs
predicted, the flagged share against the detector's clean false-positive rate, the median
detector score, the median top-class confidence and the model errors.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import AdvtrainError


@dataclass
class Snapshot:
    """One poll's figures."""

    at: float
    requests: dict[str, float] = field(default_factory=dict)  # status -> count (all endpoints)
    predict_requests: float = 0.0
    inputs: float = 0.0
    flagged: float = 0.0
    flagged_share: float | None = None
    model_errors: float = 0.0
    threshold: float | None = None
    latency: dict[str, float | None] = field(default_factory=dict)  # p50, p99 of /predict
    score_median: float | None = None
    confidence_median: float | None = None


def fetch(url: str, token: str | None = None, timeout: float = 5.0) -> str:
    """The Prometheus text at ``url`` (``/metrics`` added when the URL has no path)."""
    if not url.startswith(("http://", "https://")):
        raise AdvtrainError(f"monitor takes an http(s) URL, got {url!r}")
    target = url.rstrip("/")
    if not target.endswith("/metrics"):
        target += "/metrics"
    request = urllib.request.Request(target)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return str(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        hint = " (give --token or ADVTRAIN_TOKEN)" if exc.code in (401, 403) else ""
        raise AdvtrainError(f"{target} answered {exc.code}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdvtrainError(f"cannot reach {target}: {reason}") from None


def parse(text: str, at: float | None = None) -> Snapshot:
    """The figures of one ``/metrics`` text."""
    from prometheus_client.parser import text_string_to_metric_families

    snap = Snapshot(at=time.time() if at is None else at)
    buckets: dict[str, list[tuple[float, float]]] = {"latency": [], "score": [], "confidence": []}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "advtrain_requests_total":
                status = labels.get("status", "?")
                snap.requests[status] = snap.requests.get(status, 0.0) + value
                if labels.get("endpoint") == "/predict":
                    snap.predict_requests += value
            elif name == "advtrain_inputs_total":
                snap.inputs = value
            elif name == "advtrain_flagged_total":
                snap.flagged = value
            elif name == "advtrain_flagged_share":
                snap.flagged_share = value
            elif name == "advtrain_model_errors_total":
                snap.model_errors = value
            elif name == "advtrain_detector_threshold":
                snap.threshold = value
            elif name == "advtrain_request_latency_seconds_bucket":
                if labels.get("endpoint") == "/predict":
                    buckets["latency"].append((_le(labels), value))
            elif name == "advtrain_detector_score_bucket":
                buckets["score"].append((_le(labels), value))
            elif name == "advtrain_confidence_bucket":
                buckets["confidence"].append((_le(labels), value))
    snap.latency = {
        "p50": histogram_quantile(0.5, buckets["latency"]),
        "p99": histogram_quantile(0.99, buckets["latency"]),
    }
    snap.score_median = histogram_quantile(0.5, buckets["score"])
    snap.confidence_median = histogram_quantile(0.5, buckets["confidence"])
    return snap


def _le(labels: dict[str, str]) -> float:
    return float(labels.get("le", "inf"))


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a cumulative histogram ``[(upper bound, count), ...]``, linear
    within a bucket (the lowest bucket's lower edge is 0 if its bound is positive, else the
    bound itself); None without observations."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    lower_bound, lower_count = (min(0.0, ordered[0][0]), 0.0)
    for bound, count in ordered:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def render(snap: Snapshot, before: Snapshot | None, url: str) -> Any:
    """A rich table of one snapshot (rates against ``before``)."""
    from rich.table import Table

    def num(value: float | None, fmt: str = "{:.4g}") -> str:
        return "-" if value is None else fmt.format(value)

    table = Table(title=f"advtrain service {url}", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    total = sum(snap.requests.values())
    rate = None
    if before is not None and snap.at > before.at:
        rate = (total - sum(before.requests.values())) / (snap.at - before.at)
    table.add_row("requests", f"{total:.0f}" + (f"  ({rate:.1f}/s)" if rate is not None else ""))
    for status in sorted(snap.requests):
        table.add_row(f"  status {status}", f"{snap.requests[status]:.0f}")
    table.add_row("/predict latency p50", num(_ms(snap.latency.get("p50")), "{:.1f} ms"))
    table.add_row("/predict latency p99", num(_ms(snap.latency.get("p99")), "{:.1f} ms"))
    table.add_row("inputs predicted", f"{snap.inputs:.0f}")
    table.add_row("flagged share", num(snap.flagged_share, "{:.2%}"))
    table.add_row("detector score median", num(snap.score_median))
    table.add_row("detector threshold", num(snap.threshold))
    table.add_row("confidence median", num(snap.confidence_median, "{:.3f}"))
    table.add_row("model errors (503)", f"{snap.model_errors:.0f}")
    return table


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def watch(
    url: str,
    *,
    token: str | None = None,
    interval: float = 2.0,
    count: int | None = None,
    show: Callable[[Any], None] | None = None,
) -> Snapshot:
    """Poll ``url`` every ``interval`` seconds (``count`` times, or until interrupted), showing
    each snapshot; returns the last."""
    if interval <= 0:
        raise AdvtrainError(f"--interval must be positive, got {interval}")
    if show is None:
        from rich.console import Console

        show = Console().print
    before: Snapshot | None = None
    polls = 0
    while True:
        snap = parse(fetch(url, token))
        show(render(snap, before, url))
        before, polls = snap, polls + 1
        if count is not None and polls >= count:
            return snap
        time.sleep(interval)
