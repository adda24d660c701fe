"""The detector protocol: a differentiable score per input, and a threshold set on clean data.

A detector watches a classifier. :meth:`Detector.score` returns one value per input, higher
meaning more suspicious, as a differentiable function of the input (so an adaptive attack can
descend it, :mod:`.adaptive`); :meth:`Detector.calibrate` sets the threshold on clean validation
inputs so that a target share of them (the false-positive rate) lies above it. An input is
flagged when its score is above the threshold.

The classifier is held beside the detector, not inside it: the detector's ``state_dict`` holds
only its own tensors (class means, a head), which :mod:`.store` saves next to a run.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..attacks.base import frozen, model_device
from ..errors import AdvtrainError

#: Quantiles of the clean validation scores kept with a detector (the monitoring histogram's
#: buckets, and the scale an adaptive attack measures its detector term in).
CLEAN_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


class Detector(nn.Module, ABC):
    """Base class of the detectors: ``score(x)`` per input (higher = more suspicious).

    Subclasses implement :meth:`score` (differentiable in ``x``), :meth:`config` (their JSON
    settings) and, where they learn something, :meth:`fit`. The threshold and the clean
    validation statistics are set by :meth:`calibrate`.
    """

    #: The registry name, written into the saved file.
    kind: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise AdvtrainError(f"a detector watches a torch.nn.Module, got {type(model).__name__}")
        object.__setattr__(self, "classifier", model)  # beside the detector, not in its state
        self.threshold = math.inf
        self.target_fpr: float | None = None
        self.clean_quantiles: dict[str, float] = {}
        self.scale = 1.0

    classifier: nn.Module

    # ------------------------------------------------------------------ scoring
    @abstractmethod
    def score(self, x: Tensor) -> Tensor:
        """One score per input, differentiable in ``x`` (higher = more suspicious)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.score(x)

    def logits_and_score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The classifier's logits and the scores of a batch (differentiable). Detectors that
        read the classifier's features override it to take both from one pass."""
        return self.classifier(x), self.score(x)

    def attack_surrogates(self) -> list[nn.Module]:
        """Classifiers whose adversarial examples are good starts for an adaptive attack on the
        pair (Tramèr et al. 2020: design the attack for the defence); none by default. A detector
        that compares the classifier on transformed copies of the input returns the classifier
        on each copy and on all of them at once."""
        return []

    def scores(self, x: Tensor, batch_size: int = 1000) -> Tensor:
        """Scores of ``x`` without gradients, in batches on the classifier's device (CPU out)."""
        device = model_device(self.classifier, default=x.device)
        out = []
        with frozen(self.classifier), frozen(self), torch.no_grad():
            for i in range(0, len(x), batch_size):
                out.append(self.score(x[i : i + batch_size].to(device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def flagged(self, scores: Tensor) -> Tensor:
        """Whether each score lies above the threshold."""
        return scores > self.threshold

    # ------------------------------------------------------------------ fitting
    def fit(self, x: Tensor, y: Tensor, **_: Any) -> Detector:
        """Learn from clean training inputs ``x`` with labels ``y`` (nothing by default)."""
        return self

    def calibrate(self, x_val: Tensor, fpr: float = 0.05, batch_size: int = 1000) -> Detector:
        """Set the threshold so that at most a share ``fpr`` of the clean inputs ``x_val``
        scores above it (the empirical ``1 - fpr`` quantile), and keep their score quantiles
        and spread."""
        if not (isinstance(fpr, (int, float)) and 0 < fpr < 1):
            raise AdvtrainError(f"fpr must be a false-positive rate between 0 and 1, got {fpr!r}")
        if len(x_val) < 2:
            raise AdvtrainError("calibrating a detector needs at least 2 clean validation inputs")
        clean = self.scores(x_val, batch_size)
        if not bool(torch.isfinite(clean).all()):
            raise AdvtrainError(f"the {self.kind} detector gave non-finite scores on clean inputs")
        self.threshold = threshold_at_fpr(clean, fpr)
        self.target_fpr = float(fpr)
        self.clean_quantiles = {
            f"{q:g}": float(torch.quantile(clean.double(), q)) for q in CLEAN_QUANTILES
        }
        self.scale = max(float(clean.double().std()), 1e-6)
        return self

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict[str, Any]:
        """The detector's own settings, as JSON (what its constructor takes)."""
        return {}

    def calibration(self) -> dict[str, Any]:
        """The threshold and what calibration measured, as JSON."""
        return {
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "clean_quantiles": dict(self.clean_quantiles),
            "scale": self.scale,
        }

    def restore_calibration(self, saved: dict[str, Any]) -> None:
        """Set what :meth:`calibration` returned."""
        try:
            self.threshold = float(saved["threshold"])
            fpr = saved.get("target_fpr")
            self.target_fpr = None if fpr is None else float(fpr)
            self.clean_quantiles = {str(k): float(v) for k, v in saved["clean_quantiles"].items()}
            self.scale = float(saved["scale"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AdvtrainError(
                f"the detector's calibration is incomplete or malformed: {exc}"
            ) from None

    def describe(self) -> str:
        """One line: the kind, its settings and the threshold."""
        settings = ", ".join(f"{k}={v}" for k, v in self.config().items())
        fpr = "" if self.target_fpr is None else f" at {self.target_fpr:.0%} clean FPR"
        return f"{self.kind}({settings}), threshold {self.threshold:.4g}{fpr}"


def threshold_at_fpr(clean: Tensor, fpr: float) -> float:
    """The smallest score threshold above which at most ``fpr`` of the ``clean`` scores lie."""
    ordered = clean.double().sort().values
    n = len(ordered)
    allowed = math.floor(fpr * n + 1e-9)  # clean inputs that may lie strictly above
    return float(ordered[n - allowed - 1]) if allowed < n else float(ordered[0]) - 1.0
