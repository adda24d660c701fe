"""Attacks, one per file, all called as ``attack(model, x, y, *, target=None) -> x_adv``."""

from .apgd import APGD, APGDDLR, APGDT
from .base import Attack, Outcome, frozen
from .fgsm import FGSM
from .hop_skip_jump import HopSkipJump
from .pgd import PGD
from .registry import ATTACKS, make_attack, register
from .transfer import Transfer, TransferReport, fit_surrogate, transfer_rate

__all__ = [
    "APGD", "APGDDLR", "APGDT", "ATTACKS", "Attack", "FGSM", "HopSkipJump", "Outcome", "PGD",
    "Transfer", "TransferReport", "fit_surrogate", "frozen", "make_attack", "register",
    "transfer_rate",
]
