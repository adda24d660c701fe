"""Detectors by name, fitted in one call, and saved beside a run as safetensors + JSON.

A detector file is an advtrain checkpoint (:mod:`advtrain.checkpoint`): the detector's own
tensors in ``NAME.safetensors`` (never a pickle) and a JSON sidecar ``NAME.json`` with the file's
SHA-256, the detector's kind, settings and calibration (threshold, target false-positive rate,
clean score quantiles). A file that is corrupt, truncated, not a detector or not fitting the
classifier is a one-line :class:`~advtrain.errors.AdvtrainError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import load_checkpoint, save_checkpoint
from ..errors import AdvtrainError, CheckpointError, unknown
from ..threat import ThreatModel
from .base import Detector
from .binary import BinaryDetector
from .mahalanobis import MahalanobisDetector
from .squeezing import FeatureSqueezingDetector

#: Detector kinds by name.
DETECTORS: dict[str, type[Detector]] = {
    MahalanobisDetector.kind: MahalanobisDetector,
    FeatureSqueezingDetector.kind: FeatureSqueezingDetector,
    BinaryDetector.kind: BinaryDetector,
}
#: The sidecar's ``format`` key of a detector file.
DETECTOR_FORMAT = "advtrain-detector"


def build_detector(kind: str, model: nn.Module, **settings: Any) -> Detector:
    """An unfitted detector of ``kind`` watching ``model``."""
    if kind not in DETECTORS:
        raise unknown("detector", kind, list(DETECTORS))
    try:
        return DETECTORS[kind](model, **settings)
    except TypeError as exc:
        raise AdvtrainError(f"{kind} detector: {exc}") from None


def fit_detector(
    kind: str,
    model: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    *,
    threat: ThreatModel,
    fpr: float = 0.05,
    seed: int = 0,
    batch_size: int = 1000,
    **settings: Any,
) -> Detector:
    """A detector of ``kind`` fitted on clean training data (and, for ``binary``, PGD examples of
    it in ``threat``), its threshold set at ``fpr`` on the clean validation inputs ``x_val``.

    Feature squeezing reduces the bit depth over the threat model's bounds (scalars) unless
    ``lower``/``upper`` are given.
    """
    if kind == FeatureSqueezingDetector.kind:
        for name in ("lower", "upper"):
            bound = getattr(threat, name)
            if name not in settings and not isinstance(bound, Tensor):
                settings[name] = float(bound)
        if "median" not in settings and x_train.dim() != 4:
            settings["median"] = 0
    detector = build_detector(kind, model, **settings)
    torch.manual_seed(seed)
    detector.fit(x_train, y_train, threat=threat, seed=seed, batch_size=batch_size)
    return detector.calibrate(x_val, fpr, batch_size)


def save_detector(detector: Detector, path: str | Path) -> Path:
    """Write ``detector`` to ``path`` (``.safetensors``) and its JSON sidecar, atomically."""
    if not isinstance(detector, Detector):
        raise AdvtrainError(f"save_detector takes a Detector, got {type(detector).__name__}")
    if detector.target_fpr is None:
        raise AdvtrainError("calibrate the detector (a threshold on clean data) before saving it")
    path = Path(path)
    meta = {
        "detector_format": DETECTOR_FORMAT,
        "kind": detector.kind,
        "settings": detector.config(),
        "calibration": detector.calibration(),
    }
    save_checkpoint(path, detector.state_dict(), meta)
    return path


def load_detector(path: str | Path, model: nn.Module, probe: Tensor | None = None) -> Detector:
    """The detector saved at ``path``, watching ``model``; with ``probe`` (a batch of valid
    inputs) it is also checked to score them, so a detector fitted to another model fails here."""
    path = Path(path)
    tensors, meta = load_checkpoint(path)
    if meta.get("detector_format") != DETECTOR_FORMAT:
        raise CheckpointError(
            f"{path} is not an advtrain detector (its JSON sidecar "
            f"{path.with_suffix('.json').name} is missing or names no detector)"
        )
    kind, settings = meta.get("kind"), meta.get("settings")
    if not isinstance(kind, str) or not isinstance(settings, dict):
        raise CheckpointError(f"{path}: the sidecar's kind or settings are malformed")
    detector = build_detector(kind, model, **settings)
    try:
        detector.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        why = lines[-1].strip() if lines else str(exc)
        raise CheckpointError(f"{path}: its tensors do not fit a {kind} detector ({why})") from None
    calibration = meta.get("calibration")
    if not isinstance(calibration, dict):
        raise CheckpointError(f"{path}: the sidecar has no calibration")
    detector.restore_calibration(calibration)
    device = next(iter(model.parameters()), torch.zeros(0)).device
    detector.to(device)
    if probe is not None:
        try:
            scores = detector.scores(probe)
        except (RuntimeError, AdvtrainError) as exc:
            raise AdvtrainError(
                f"the detector {path} does not fit this model: {str(exc).splitlines()[0]}"
            ) from None
        if scores.shape != (len(probe),):
            raise AdvtrainError(f"the detector {path} gives scores of shape {tuple(scores.shape)}")
    return detector.eval()
