"""Attacks, one per file, all called as ``attack(model, x, y, *, target=None) -> x_adv``."""

from .adaptive import BPDA, EOT, draws_per_call, is_randomized, majority_vote
from .apgd import APGD, APGDDLR, APGDT
from .base import Attack, MinNormAttack, MinNormResult, Outcome, frozen
from .cw import CarliniWagnerL2
from .deepfool import DeepFool
from .fab import FAB, FABT
from .feature_search import FeatureSearch
from .fgsm import FGSM
from .give_up import GiveUp
from .hop_skip_jump import HopSkipJump
from .pgd import PGD
from .registry import ATTACKS, attack_options, make_attack, register
from .square import Square
from .square_forward import FullQueries, QueryForward, WindowQueries
from .transfer import Transfer

__all__ = [
    "APGD",
    "APGDDLR",
    "APGDT",
    "ATTACKS",
    "BPDA",
    "EOT",
    "FAB",
    "FABT",
    "FGSM",
    "PGD",
    "Attack",
    "CarliniWagnerL2",
    "DeepFool",
    "FeatureSearch",
    "FullQueries",
    "GiveUp",
    "HopSkipJump",
    "MinNormAttack",
    "MinNormResult",
    "Outcome",
    "QueryForward",
    "Square",
    "Transfer",
    "WindowQueries",
    "attack_options",
    "draws_per_call",
    "frozen",
    "is_randomized",
    "majority_vote",
    "make_attack",
    "register",
]
