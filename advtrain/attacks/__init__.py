"""Attacks, one per file, all called as ``attack(model, x, y, *, target=None) -> x_adv``."""

from .apgd import APGD, APGDDLR, APGDT
from .base import Attack, Outcome, frozen
from .fgsm import FGSM
from .pgd import PGD
from .registry import ATTACKS, make_attack, register

__all__ = [
    "APGD", "APGDDLR", "APGDT", "ATTACKS", "Attack", "FGSM", "Outcome", "PGD", "frozen",
    "make_attack", "register",
]
