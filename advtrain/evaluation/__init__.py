"""Measuring robustness: accuracies now; the attack cascade, metrics and reports build on them."""

from .basic import AccuracyPair, clean_and_robust_accuracy, predict

__all__ = ["AccuracyPair", "clean_and_robust_accuracy", "predict"]
