"""Measuring robustness: the attack cascade, metrics, gradient-masking diagnostics, reports."""

from .basic import AccuracyPair, clean_and_robust_accuracy, predict
from .findings import Check, CheckName, Escalation
from .report import ClassMetrics, Report, robustness_score
from .suite import evaluate
from .transfer import TransferReport, transfer_rate

__all__ = [
    "AccuracyPair",
    "Check",
    "CheckName",
    "ClassMetrics",
    "Escalation",
    "Report",
    "TransferReport",
    "clean_and_robust_accuracy",
    "evaluate",
    "predict",
    "robustness_score",
    "transfer_rate",
]
