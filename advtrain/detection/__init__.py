"""Adversarial-input detectors, and their honest evaluation.

Three detectors, each returning a differentiable score per input (higher = more suspicious) with
a threshold set for a target false-positive rate on clean validation data: Mahalanobis distance
in feature space (Lee et al. 2018, :mod:`.mahalanobis`), feature squeezing (Xu et al. 2018,
:mod:`.squeezing`), and a binary detector trained on our own PGD examples (Metzen et al. 2017,
:mod:`.binary`). :func:`fit_detector` fits one, :func:`save_detector`/:func:`load_detector` keep
it beside a run (safetensors + JSON), and :func:`evaluate_detector` measures it against the
standard suite's examples and against :class:`DetectorAwarePGD`, the adaptive attack on the pair.

>>> detector = fit_detector("mahalanobis", model, x_train, y_train, x_val, threat=threat)
>>> figures = evaluate_detector(model, detector, x_test, y_test, threat)
>>> print(figures.summary())
"""

from .adaptive import DetectorAwarePGD
from .base import Detector, threshold_at_fpr
from .binary import BinaryDetector
from .evaluate import AttackFigures, DetectionReport, auroc, evaluate_detector, reduction_note
from .mahalanobis import MahalanobisDetector
from .squeezing import FeatureSqueezingDetector, median_filter, reduce_bit_depth
from .store import DETECTORS, build_detector, fit_detector, load_detector, save_detector

__all__ = [
    "DETECTORS",
    "AttackFigures",
    "BinaryDetector",
    "DetectionReport",
    "Detector",
    "DetectorAwarePGD",
    "FeatureSqueezingDetector",
    "MahalanobisDetector",
    "auroc",
    "build_detector",
    "evaluate_detector",
    "fit_detector",
    "load_detector",
    "median_filter",
    "reduce_bit_depth",
    "reduction_note",
    "save_detector",
    "threshold_at_fpr",
]
