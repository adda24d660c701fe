"""Measuring robustness: the attack cascade, metrics, gradient-masking diagnostics, reports."""

from .basic import AccuracyPair, clean_and_robust_accuracy, predict
from .report import Check, ClassMetrics, Escalation, Report, robustness_score
from .suite import evaluate

__all__ = [
    "AccuracyPair",
    "Check",
    "ClassMetrics",
    "Escalation",
    "Report",
    "clean_and_robust_accuracy",
    "evaluate",
    "predict",
    "robustness_score",
]
