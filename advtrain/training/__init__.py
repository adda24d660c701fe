"""Adversarial training: methods as batch losses, and the trainer that runs them."""

from .config import TrainConfig, load_config
from .methods import METHODS, make_method, method
from .surrogate import fit_surrogate as fit_surrogate
from .trainer import Trainer, TrainResult

__all__ = [
    "METHODS",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_config",
    "make_method",
    "method",
]
