"""What the score-based random searches share: their budget, schedule start and objective.

Square Attack (Andriushchenko et al., ECCV 2020) and its tabular form
(:class:`~advtrain.attacks.FeatureSearch`) both query the model ``n_queries`` times per point
(the clean check included), move a fraction of the features that starts at ``p_init`` and shrinks
on Square's schedule, and keep a proposal when it lowers the CW margin (or raises the
cross-entropy; targeted runs maximise minus the cross-entropy of the target).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ..errors import AdvtrainError
from ..losses import cross_entropy, cw_margin
from ..threat import ThreatModel
from ..util import check_positive_int
from .base import Attack

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .base import AttackOptions

#: The untargeted losses a random search can keep proposals by.
RANDOM_SEARCH_LOSSES = ("margin", "ce")


class RandomSearch(Attack):
    """The base of score-based random searches: ``n_queries`` (default 5000) model queries per
    point and run, ``p_init`` (default 0.8) the first fraction of the features a proposal moves,
    ``loss`` ``"margin"`` (default) or ``"ce"``. Query counts are on :meth:`outcome`'s result."""

    norms = ("linf", "l2")
    counts_queries = True

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        n_queries: int = 5000,
        p_init: float = 0.8,
        loss: str = "margin",
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(threat, **options)
        check_positive_int("n_queries", n_queries)
        if isinstance(p_init, bool) or not isinstance(p_init, (int, float)) or not 0 < p_init <= 1:
            raise AdvtrainError(f"p_init must be in (0, 1], got {p_init!r}")
        if loss not in RANDOM_SEARCH_LOSSES:
            raise AdvtrainError(
                f"unknown loss {loss!r}; choose one of: {', '.join(RANDOM_SEARCH_LOSSES)}"
            )
        self.n_queries, self.p_init, self.loss = n_queries, float(p_init), loss

    def _hyperparameters(self) -> dict[str, object]:
        return {
            **super()._hyperparameters(),
            "n_queries": self.n_queries,
            "p_init": self.p_init,
            "loss": self.loss,
        }

    @property
    def screens_clean_points(self) -> bool:
        return False  # the clean point is the search's first query, counted in its budget

    def _objective(self, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        if target is not None:
            return -cross_entropy(logits, target)
        return cw_margin(logits, y) if self.loss == "margin" else cross_entropy(logits, y)
