"""Model architectures by name, and models that users bring as ``file.py:factory``.

Every model maps a batch of inputs to logits (no softmax).
"""

from .adapters import NORMALIZATIONS, Normalize, logits_model, with_normalization
from .checks import check_model_output
from .preact_resnet import PreActBlock, PreActResNet
from .registry import BUILDERS, MODELS, build_model
from .trees import TreeEnsemble, load_tree_model
from .user import load_user_model

__all__ = [
    "BUILDERS",
    "MODELS",
    "NORMALIZATIONS",
    "Normalize",
    "PreActBlock",
    "PreActResNet",
    "TreeEnsemble",
    "build_model",
    "check_model_output",
    "load_tree_model",
    "load_user_model",
    "logits_model",
    "with_normalization",
]
