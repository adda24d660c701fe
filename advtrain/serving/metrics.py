"""The service's Prometheus metrics, in a registry of the app's own (never the global one, so two
apps in one process count apart).

What an on-call engineer watches for an attack campaign or for drift:

- ``advtrain_requests_total{endpoint, status}`` and ``advtrain_request_latency_seconds{endpoint}``;
- ``advtrain_inputs_total``, ``advtrain_flagged_total`` and ``advtrain_flagged_share`` (flagged
  inputs over all inputs since the start: at the detector's threshold it should sit near its
  clean false-positive rate; a rise is an attack or a shift);
- ``advtrain_detector_score``: a histogram whose buckets are the clean validation scores'
  quantiles and the threshold, so a drift of the score distribution shows bucket by bucket;
- ``advtrain_confidence``: the top class probability (adversarial and shifted inputs often
  move it);
- ``advtrain_predictions_total{class}``, ``advtrain_model_errors_total`` and
  ``advtrain_detector_threshold``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from torch import Tensor

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ServiceMetrics:
    """The counters, gauges and histograms of one app, in ``registry``."""

    def __init__(self, score_buckets: Sequence[float] = (), threshold: float | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "advtrain_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "advtrain_request_latency_seconds",
            "Request latency by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inputs = Counter("advtrain_inputs", "Inputs predicted", registry=r)
        self.flagged = Counter("advtrain_flagged", "Inputs the detector flagged", registry=r)
        self.flagged_share = Gauge(
            "advtrain_flagged_share", "Flagged inputs over all inputs since the start", registry=r
        )
        self.confidence = Histogram(
            "advtrain_confidence",
            "Top class probability per input",
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "advtrain_predictions", "Predicted class per input", ["class_"], registry=r
        )
        self.model_errors = Counter(
            "advtrain_model_errors", "Model calls that raised (answered 503)", registry=r
        )
        self.score: Histogram | None = None
        if threshold is not None:
            buckets = sorted({float(b) for b in (*score_buckets, threshold)})
            self.score = Histogram(
                "advtrain_detector_score",
                "Detector score per input (higher = more suspicious)",
                buckets=buckets,
                registry=r,
            )
            Gauge("advtrain_detector_threshold", "The detector's threshold", registry=r).set(
                threshold
            )
        self._inputs = 0
        self._flagged = 0
        self._lock = threading.Lock()

    def observe_predictions(
        self, probabilities: Tensor, scores: Tensor | None, flagged: Tensor | None
    ) -> None:
        """Count a batch's predictions (and its detector scores and flags)."""
        top, classes = probabilities.max(dim=1)
        for p, c in zip(top.tolist(), classes.tolist()):
            self.confidence.observe(p)
            self.predictions.labels(class_=str(c)).inc()
        hits = 0
        if scores is not None and flagged is not None and self.score is not None:
            for s in scores.tolist():
                self.score.observe(s)
            hits = int(flagged.sum())
        with self._lock:
            self.inputs.inc(len(probabilities))
            self.flagged.inc(hits)
            self._inputs += len(probabilities)
            self._flagged += hits
            self.flagged_share.set(self._flagged / self._inputs if self._inputs else 0.0)
