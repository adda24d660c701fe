"""What the gradient-masking checks found, as data: their names, severities and records.

:class:`CheckName` names every check of :mod:`.diagnostics`; the suite's escalation rules
(:mod:`.escalation`) refer to checks by these members, and the reports carry their values (the
strings of the JSON file). :class:`Check` is one check's result and :class:`Escalation` one
stronger attack run because checks fired. This module imports nothing from the rest of the
package, so the report, its HTML page and the diagnostics can all stand on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

#: Severity of a diagnostic: a verdict says masking beyond doubt, a warning says "look here".
VERDICT, WARNING = "verdict", "warning"


class CheckName(str, Enum):
    """The checks of :mod:`.diagnostics`; each value is the name the report shows."""

    RANDOMNESS = "randomness"
    PROBABILITIES = "probabilities instead of logits"
    ZERO_GRADIENTS = "zero or NaN gradients"
    SATURATED_SOFTMAX = "saturated softmax"
    SINGLE_STEP = "single step stronger than iterative"
    UNBOUNDED = "unbounded attack fails"
    EPS_GROWTH = "success does not grow with eps"
    BLACK_BOX = "black-box stronger than white-box"
    LOSS_IMPROVING = "loss still improving"
    SILENT_SUCCESS = "silent success"
    TRANSFER = "transfer stronger than white-box"
    SELF_TEST = "binarization self-test"

    def __str__(self) -> str:  # the report's string, in f-strings too
        return self.value


#: Checks whose verdict means the gradients cannot be trusted: straight-through gradients and a
#: stronger black-box attack are called for.
MASKING_CHECKS = frozenset(
    {
        CheckName.ZERO_GRADIENTS,
        CheckName.SINGLE_STEP,
        CheckName.UNBOUNDED,
        CheckName.EPS_GROWTH,
        CheckName.BLACK_BOX,
        CheckName.TRANSFER,
    }
)


@dataclass
class Check:
    """One gradient-masking diagnostic.

    ``name`` is a :class:`CheckName` value for the suite's checks (a member given here is
    stored as its string). ``severity`` is ``"verdict"`` for checks that fire only when the
    evaluation is provably incomplete (an honest robust model never triggers them) and
    ``"warning"`` for checks that can fire on an honest model and call for a closer look.
    ``evidence`` holds the numbers.
    """

    name: str
    triggered: bool
    detail: str
    severity: str = WARNING
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.name, Enum):
            self.name = str(self.name.value)


@dataclass
class Escalation:
    """A stronger attack the evaluation ran on its own because a check fired."""

    reason: str  # the names of the checks that called for it, comma-separated
    action: str  # what was done, in plain words
    robust_before: float
    robust_after: float
