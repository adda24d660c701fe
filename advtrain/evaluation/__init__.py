"""Measuring robustness: the attack cascade, metrics, gradient-masking diagnostics, reports."""

from .attack_run import AttackRun, run_attack
from .basic import AccuracyPair, clean_and_robust_accuracy, predict
from .black_box import evaluate_black_box
from .findings import Check, CheckName, Escalation
from .report import ClassMetrics, Report, robustness_score
from .suite import evaluate
from .transfer import TransferReport, transfer_rate

__all__ = [
    "AccuracyPair",
    "AttackRun",
    "Check",
    "CheckName",
    "ClassMetrics",
    "Escalation",
    "Report",
    "TransferReport",
    "clean_and_robust_accuracy",
    "evaluate",
    "evaluate_black_box",
    "predict",
    "robustness_score",
    "run_attack",
    "transfer_rate",
]
