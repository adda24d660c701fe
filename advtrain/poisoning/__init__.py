"""Poisoned training data: backdoor attacks, their detection, and the attack x defence matrix.

>>> from advtrain.poisoning import badnets, run_matrix
>>> attack = badnets(data.info, rate=0.01, target=0)
>>> poisoned = attack.poison(data.train)          # poisoned.indices: the rows changed
>>> matrix = run_matrix(data, "mnist-small", "badnets,blended", "none,spectral,ac,strip")

Attacks (:mod:`.backdoors`): BadNets, Blended, clean-label, a table feature trigger. Defences:
spectral signatures and activation clustering on the training rows (:mod:`.defences`, with the
penultimate layer's features from :mod:`advtrain.models.features`), STRIP at inference
(:mod:`.strip`).
Neural Cleanse (Wang et al. 2019) is not implemented.
"""

from ..models.features import penultimate_features, readout_layer
from .backdoors import (
    BACKDOORS,
    Backdoor,
    Poisoned,
    badnets,
    blended,
    clean_label,
    feature_trigger,
    make_backdoor,
    triggered,
)
from .defences import (
    Detection,
    Suspects,
    activation_clustering,
    detection,
    remove,
    spectral_signatures,
)
from .matrix import DEFENCES, Cell, Matrix, MatrixSettings, run_matrix
from .scan import ScanResult, scan
from .strip import Strip, fit_strip
from .triggers import BlendTrigger, FeatureTrigger, PatchTrigger, Trigger

__all__ = [
    "BACKDOORS",
    "DEFENCES",
    "Backdoor",
    "BlendTrigger",
    "Cell",
    "Detection",
    "FeatureTrigger",
    "Matrix",
    "MatrixSettings",
    "PatchTrigger",
    "Poisoned",
    "ScanResult",
    "Strip",
    "Suspects",
    "Trigger",
    "activation_clustering",
    "badnets",
    "blended",
    "clean_label",
    "detection",
    "feature_trigger",
    "fit_strip",
    "make_backdoor",
    "penultimate_features",
    "readout_layer",
    "remove",
    "run_matrix",
    "scan",
    "spectral_signatures",
    "triggered",
]
