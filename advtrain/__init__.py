"""advtrain: attack, harden and honestly measure the adversarial robustness of PyTorch models.

>>> import advtrain
>>> data = advtrain.load_dataset("digits")
>>> model = advtrain.build_model("digits-cnn", in_shape=data.info.shape, n_classes=10)
>>> advtrain.Trainer(model, data, advtrain.TrainConfig(method="pgd")).fit()
>>> x_adv = advtrain.PGD(data.info.threat_model())(model, data.test.x, data.test.y)

A table of your own: ``advtrain.load_table("tx.csv", "tx.toml")`` gives the same kind of dataset,
whose threat model also holds the schema's constraints (integers, categories, directions, rules).
Images of your own: ``advtrain.load_images("scans/")`` (class folders, an ``.npz``, CIFAR files),
read from disk as they are indexed.
"""

from .attacks import FGSM, PGD, Attack, make_attack
from .data import load_dataset, load_images, load_table
from .errors import AdvtrainError
from .evaluation import Report, clean_and_robust_accuracy, evaluate, predict
from .models import build_model, load_user_model
from .threat import ThreatModel
from .training import TrainConfig, Trainer

__version__ = "0.1.0"
__all__ = [
    "FGSM",
    "PGD",
    "AdvtrainError",
    "Attack",
    "Report",
    "ThreatModel",
    "TrainConfig",
    "Trainer",
    "__version__",
    "build_model",
    "clean_and_robust_accuracy",
    "evaluate",
    "load_dataset",
    "load_images",
    "load_table",
    "load_user_model",
    "make_attack",
    "predict",
]
