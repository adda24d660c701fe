"""The steps of a cascade: each suite's attacks, named and seeded, and the losses they ascend.

:func:`suite_attacks` names the attacks of each suite of :func:`advtrain.evaluate` (run by
:class:`.cascade.Cascade`); :func:`gradient_step` and :func:`margin_attack` build the white-box
and minimum-norm attacks the diagnostics and escalations call on.

With two classes the DLR losses carry no signal: the denominator of DLR (``z_(1) - z_(3)``, the
third logit clamped to the last) and of targeted DLR is then the gap between the only two
logits, so the loss is the constant ``+-1`` and its gradient zero (AutoAttack issue #70). There
every step that would ascend DLR ascends the CW margin instead (:func:`signal_loss`):
APGD-T becomes APGD with the margin loss (``apgd-cw``; with one other class the targeted
attack has a single target, the margin's), APGD-DLR becomes APGD-CW, and the PGD-l1 cascade
runs the CE and margin losses only. FAB-T (linearised logit differences), Square (margin) and
HopSkipJump (labels) need no change. The steps of a model with three classes or more are those
of AutoAttack, unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

from ..attacks import APGD, APGDT, FAB, FABT, PGD, Attack, GiveUp, HopSkipJump, Square
from ..attacks.base import MinNormAttack
from ..attacks.give_up import APGD_FACTOR
from ..errors import AdvtrainError
from ..threat import ThreatModel
from .shards import step_seed

#: The suites of :func:`advtrain.evaluate`.
SUITES = ("quick", "standard", "thorough")
#: Why the DLR losses are left out for two classes, as the report says it.
DLR_SKIPPED = (
    "DLR skipped: 2 classes (its denominator is the gap between the only two logits, so the loss "
    "is constant and its gradient zero); the CW margin loss is used instead"
)


def binary(n_classes: int) -> bool:
    """Whether the DLR losses are constant: a model with at most two classes."""
    return n_classes <= 2


def signal_loss(loss: str, n_classes: int) -> str:
    """``loss``, or the CW margin (``"cw"``) where ``loss`` is DLR and the model has two
    classes (DLR is then constant: see the module's docstring)."""
    return "cw" if loss == "dlr" and binary(n_classes) else loss


def step_loss(attack: Attack) -> str:
    """The loss an attack ascends, in the report's words: ``ce``, ``cw`` (the CW margin; Square's
    ``"margin"``), ``dlr``; ``logit differences`` for FAB (it linearises the differences of the
    logits); ``labels only`` for HopSkipJump; the class name for any other attack without one."""
    loss = getattr(attack, "loss", None)
    if isinstance(loss, str):
        return "cw" if loss == "margin" else loss
    if isinstance(attack, FAB):
        return "logit differences"
    if isinstance(attack, HopSkipJump):
        return "labels only"
    return type(attack).__name__


@dataclass(frozen=True)
class Step:
    """One attack of the cascade, with the name it is reported under."""

    name: str
    attack: Attack
    #: A minimum-norm attack run unbounded: its norms give the robust margins of every point
    #: classified correctly (not only the standing ones), and it breaks those within eps.
    min_norm: bool = False

    def __post_init__(self) -> None:
        if self.min_norm and not isinstance(self.attack, MinNormAttack):
            raise AdvtrainError(f"step {self.name}: a min_norm step needs a MinNormAttack")

    def seeded(self, seed: int, scope: str = "") -> Step:
        """This step with a copy of its attack seeded from its name:
        ``step_seed(seed, scope + name)`` (:func:`.shards.step_seed`)."""
        attack = copy.copy(self.attack)
        attack.seed = step_seed(seed, scope + self.name)
        return replace(self, attack=attack)


def suite_attacks(
    suite: str, threat: ThreatModel, n_classes: int, seed: int, batch_size: int | None = None
) -> list[Step]:
    """The attacks of a suite, in the order they run, each seeded from its name
    (:meth:`Step.seeded`).

    - ``quick``: APGD-CE (100 iterations), APGD-T over 3 targets, Square with 1,000 queries.
    - ``standard``: AutoAttack's standard recipe with the paper's settings (APGD-CE, APGD-T,
      FAB-T, Square with 5,000 queries), but the targeted steps aim at the most likely other
      classes only, where AutoAttack's standard version takes 9: APGD-T at ``min(4, n_classes -
      1)``, FAB-T at ``min(3, n_classes - 1)``. The closest classes are the ones a targeted
      attack breaks and hold the smallest margins (MALT, Melamed et al. 2024, makes the same bet
      with another ranking). FAB-T runs unbounded: its norms are the robust margins.
    - In every suite, for linf, ``apgd-t`` and ``square`` give up on points whose loss their
      progress will not bring to zero (:mod:`~advtrain.attacks.give_up`, after A3, Liu et al.
      2022); the escalations and the thorough suite's extra runs spend every iteration and
      query. Under l2 neither does: a stalled APGD-T point can still break late there, and
      Square saves little.
    - ``thorough``: standard with FAB-T over ``min(9, n_classes - 1)`` targets, then APGD-CE and
      APGD-DLR with 5 restarts, APGD-T over every other class, and Square with 10,000 queries and
      2 restarts.

    For l1 (no APGD, FAB or Square here) the cascade is PGD-l1 with the cross-entropy, CW-margin and
    DLR losses (100 steps, restarts as the suite allows).

    With two classes no step ascends DLR (:data:`DLR_SKIPPED`): ``apgd-t`` is replaced by
    ``apgd-cw`` (APGD with the CW margin loss), ``apgd-dlr x5`` by ``apgd-cw x5``, ``apgd-t all``
    is left out (its only target is the margin's, which ``apgd-cw x5`` already ascends) and
    ``pgd-l1-dlr`` too.
    """
    if suite not in SUITES:
        raise AdvtrainError(f"unknown suite {suite!r}; choose one of: {', '.join(SUITES)}")
    two = binary(n_classes)
    targets = min(9, max(n_classes - 1, 1))
    steps: list[Step]
    if threat.norm == "l1":
        restarts = {"quick": 1, "standard": 2, "thorough": 5}[suite]
        steps = [
            Step(
                f"pgd-l1-{loss}",
                PGD(threat, steps=100, loss=loss, restarts=restarts, batch_size=batch_size),
            )
            for loss in (("ce", "cw") if two else ("ce", "cw", "dlr"))
        ]
    else:
        second = (
            Step("apgd-cw", APGD(threat, loss="cw", batch_size=batch_size))
            if two
            else Step(
                "apgd-t",
                APGDT(
                    threat,
                    n_targets=min(3 if suite == "quick" else 4, targets),
                    give_up=APGD_FACTOR if threat.norm == "linf" else None,  # see above
                    batch_size=batch_size,
                ),
            )
        )
        steps = [Step("apgd-ce", APGD(threat, batch_size=batch_size)), second]
        if suite != "quick":
            fab_targets = targets if suite == "thorough" else min(3, targets)
            unbounded = threat.replace(eps=float("inf"))
            steps.append(
                Step("fab-t", FABT(unbounded, n_targets=fab_targets, batch_size=batch_size), True)
            )
        queries = 1000 if suite == "quick" else 5000
        linf = threat.norm == "linf"
        square = Square(
            threat, n_queries=queries, give_up=GiveUp() if linf else None, batch_size=batch_size
        )
        steps.append(Step("square", square))
    if suite == "thorough" and threat.norm != "l1":
        others = max(n_classes - 1, 1)
        steps.append(Step("apgd-ce x5", APGD(threat, restarts=5, batch_size=batch_size)))
        if two:
            steps.append(
                Step("apgd-cw x5", APGD(threat, loss="cw", restarts=5, batch_size=batch_size))
            )
        else:
            steps += [
                Step("apgd-dlr x5", APGD(threat, loss="dlr", restarts=5, batch_size=batch_size)),
                Step("apgd-t all", APGDT(threat, n_targets=others, batch_size=batch_size)),
            ]
        steps.append(
            Step(
                "square 10k x2", Square(threat, n_queries=10000, restarts=2, batch_size=batch_size)
            )
        )
    return [step.seeded(seed) for step in steps]


def gradient_step(
    threat: ThreatModel,
    *,
    loss: str = "ce",
    steps: int = 100,
    restarts: int = 1,
    seed: int | None = None,
    batch_size: int | None = None,
    note: str = "",
) -> Step:
    """APGD with ``loss`` (Croce & Hein 2020), or for l1, where APGD is not offered here, PGD
    with the sparse l1 step: the white-box attack the diagnostics and escalations call on.
    Named ``apgd-ce``, ``pgd-l1-dlr 400 x3``, ... (with ``note`` appended); its attack is seeded
    with ``seed`` as given (see :meth:`Step.seeded` to seed it from its name)."""
    attack: Attack
    if threat.norm == "l1":
        name = f"pgd-l1-{loss}"
        attack = PGD(
            threat, steps=steps, loss=loss, restarts=restarts, seed=seed, batch_size=batch_size
        )
    else:
        name = f"apgd-{loss}"
        attack = APGD(
            threat, steps=steps, loss=loss, restarts=restarts, seed=seed, batch_size=batch_size
        )
    name += (f" {steps}" if steps != 100 else "") + (f" x{restarts}" if restarts > 1 else "")
    return Step(name + (f" {note}" if note else ""), attack)


def margin_attack(
    threat: ThreatModel, n_classes: int, seed: int | None, batch_size: int | None = None
) -> MinNormAttack:
    """The minimum-norm attack that measures the robust margin of points broken before FAB-T ran:
    FAB-T over the ``min(3, n_classes - 1)`` most likely other classes, as in the cascade."""
    return FABT(
        threat.replace(eps=float("inf")),
        n_targets=min(3, max(n_classes - 1, 1)),
        seed=seed,
        batch_size=batch_size,
    )
