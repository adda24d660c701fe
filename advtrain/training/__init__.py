"""Adversarial training: methods (a batch loss and what the trainer must honour), and the trainer
that runs them."""

from . import certified_methods as certified_methods  # registers ibp, crown-ibp
from . import noise_methods as noise_methods  # registers gaussian
from .config import TrainConfig, load_config
from .method import Method, mix
from .methods import METHODS, make_method, method
from .surrogate import fit_surrogate as fit_surrogate
from .trainer import Trainer, TrainResult

__all__ = [
    "METHODS",
    "Method",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_config",
    "make_method",
    "method",
    "mix",
]
