"""advtrain: attack, harden and honestly measure the adversarial robustness of PyTorch models."""

from .errors import AdvtrainError
from .threat import ThreatModel

__version__ = "0.1.0"
__all__ = ["AdvtrainError", "ThreatModel", "__version__"]
