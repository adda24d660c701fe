"""Model architectures by name, and models that users bring as ``file.py:factory``.

Every model maps a batch of inputs to logits (no softmax).
"""

from .preact_resnet import PreActBlock, PreActResNet
from .registry import BUILDERS, MODELS, build_model
from .user import load_user_model

__all__ = ["BUILDERS", "MODELS", "PreActBlock", "PreActResNet", "build_model", "load_user_model"]
