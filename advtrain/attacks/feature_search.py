"""Feature search: Square Attack's random search for table rows, score-based, linf or l2.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box adversarial
attack via random search" (ECCV 2020), with the image windows replaced by random subsets of the
features that may change: the columns of a table have no neighbours, so a square of adjacent
pixels means nothing there. It sees only the model's scores (every forward pass runs under
``torch.no_grad()``), so it attacks tree ensembles (:class:`~advtrain.models.trees.TreeEnsemble`)
and any other model that returns logits or log-probabilities.

From a start at a vertex of the ball (every changeable feature at ``x ± eps``, random signs) it
repeats: pick ``k`` of the changeable features at random, move them to a vertex of the ball
restricted to them, project the candidate with ``threat.project(candidate, x)`` (bounds,
immutable features, and a table's constraints: integers, one-hot groups, directions and linear
rules, repaired as :class:`~advtrain.feasibility.FeatureConstraints` does), query the model and
keep the candidate when the loss improves (or the point becomes adversarial).

- linf: the ``k`` features go to ``x ± eps``, one random sign each. Where that would leave the
  point as it is, a uniformly drawn non-empty subset of the signs is flipped, as Square redraws
  a window that would not change the point.
- l2: the ``k`` features get ``±r / sqrt(k)``, where ``r`` is the budget the other features leave
  (``sqrt(eps^2 - ||delta_rest||^2)``) after a second random subset of ``k`` features is emptied:
  Square's l2 proposal moves the mass of a second window into the first in the same way, so the
  search can gather the budget on the features that matter. The perturbation always has norm eps
  before the projection.

A feature that may only increase (or only decrease: the constraints' ``direction``) always takes
the sign it is allowed. ``k = max(1, round(p * m))`` of the ``m`` changeable features, where
``p`` follows Square's schedule (:func:`~advtrain.attacks.square_geometry.p_selection`:
``p_init`` halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of a 10,000-
query run, rescaled to the budget). Defaults are Square's (``n_queries=5000``, ``p_init=0.8``,
``loss="margin"``: the CW margin, ``"ce"`` for cross-entropy; targeted runs maximise minus the
cross-entropy of the target). Every forward pass of a point counts as a query, the check of the
clean point and the start included, so no point uses more than ``n_queries`` per run;
``outcome(...).queries`` gives each point's count. A point leaves the search as soon as it is
adversarial, and a candidate equal to the current point is not queried. The subsets are drawn
per point. Inputs of any shape are searched as flat feature vectors.

Example:
    >>> x_adv = FeatureSearch(threat, n_queries=1000)(tree_model, z, y)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..losses import is_adversarial
from .base import Outcome
from .fast_grad import suspended
from .random_search import RANDOM_SEARCH_LOSSES, RandomSearch
from .registry import register
from .square_geometry import nonempty_subsets, p_selection, random_signs

if TYPE_CHECKING:
    pass

FEATURE_SEARCH_LOSSES = RANDOM_SEARCH_LOSSES


@dataclass
class _State:
    """The points still searched (rows ``index`` of the batch), flattened to ``(n, D)``."""

    index: Tensor
    x: Tensor
    y: Tensor
    target: Tensor | None
    cur: Tensor
    loss: Tensor

    def keep(self, rows: Tensor) -> _State:
        """The rows flagged in ``rows``."""
        kept = rows.nonzero().squeeze(1)
        return _State(
            self.index[kept],
            self.x[kept],
            self.y[kept],
            None if self.target is None else self.target[kept],
            self.cur[kept],
            self.loss[kept],
        )


@register("feature-search")
class FeatureSearch(RandomSearch):
    """Square Attack's random search over random subsets of features (score-based, linf or l2).

    Args:
        threat: the threat model (linf or l2, with a table's constraints where it has them), or
            ``norm``/``eps``/bounds/mask as keywords.
        n_queries: model queries per point and run (default 5000), the clean check included.
        p_init: initial fraction of the changeable features a proposal moves (default 0.8).
        loss: ``"margin"`` (CW margin, default) or ``"ce"``, for untargeted runs; targeted runs
            maximise minus the cross-entropy of the target.
        restarts, batch_size, seed: see :class:`~advtrain.attacks.base.Attack`.

    The queries each point used are on :meth:`outcome`'s result (``.queries``, int64, summed over
    restarts).
    """

    # ------------------------------------------------------------------ the search
    def run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        n = len(x)
        queries = torch.ones(n, dtype=torch.int64, device=x.device)
        with torch.no_grad(), suspended():
            logits = model(x).float()
            success = is_adversarial(logits, y, target)
            best = Outcome(x.clone(), success, self._objective(logits, y, target), queries)
            if self.threat.eps > 0 and self.n_queries > 1 and not bool(success.all()):
                self._search(model, x, y, target, best, generator)
        return best

    def _geometry(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per flat feature: whether it may change (the mask) and the sign it must take (+1, -1;
        0 where either; the table constraints' ``direction``)."""
        sample = tuple(x.shape[1:])
        width = math.prod(sample)
        mask = self.threat.mask
        mutable = (
            torch.ones(width, dtype=torch.bool, device=x.device)
            if mask is None
            else mask.to(x.device).expand(sample).reshape(width)
        )
        constraints = self.threat.constraints
        if constraints is None:
            direction = torch.zeros(width, dtype=x.dtype, device=x.device)
        else:
            direction = constraints.direction.to(x.device, x.dtype).reshape(width)
        return mutable, direction

    def _search(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        best: Outcome,
        generator: torch.Generator | None,
    ) -> None:
        """Random search on the points of ``best`` not yet adversarial; ``best`` (its queries
        included) is updated in place."""
        n, shape = len(x), x.shape
        mutable, direction = self._geometry(x)
        m = int(mutable.sum())
        if m == 0:
            return
        rows = (~best.success).nonzero().squeeze(1)
        flat = x.reshape(n, -1)
        state = _State(
            rows,
            flat[rows],
            y[rows],
            None if target is None else target[rows],
            flat[rows].clone(),
            best.loss[rows].clone(),
        )
        assert best.queries is not None

        def project(candidate: Tensor, clean: Tensor) -> Tensor:
            sample = (len(candidate), *shape[1:])
            return self.threat.project(candidate.reshape(sample), clean.reshape(sample)).reshape(
                len(candidate), -1
            )

        for i in range(-1, self.n_queries - 2):
            if len(state.index) == 0:
                break
            delta = (
                self._start(state, mutable, direction, m, generator)
                if i == -1
                else self._propose(state, mutable, direction, m, i, generator)
            )
            candidate = project(state.x + delta, state.x)
            state = self._query(model, state, candidate, best, shape, first=i == -1)
        if len(state.index):
            best.x_adv[state.index] = state.cur.reshape(len(state.index), *shape[1:])
            best.loss[state.index] = state.loss

    def _signs(
        self,
        shape: tuple[int, ...],
        direction: Tensor,
        generator: torch.Generator | None,
        like: Tensor,
    ) -> Tensor:
        """Random ``±1``, the allowed sign where a feature has a direction (``direction`` is
        broadcast or gathered to ``shape`` by the caller)."""
        signs = random_signs(shape, generator, like)
        return torch.where(direction != 0, direction, signs)

    def _start(
        self,
        state: _State,
        mutable: Tensor,
        direction: Tensor,
        m: int,
        generator: torch.Generator | None,
    ) -> Tensor:
        """A vertex of the ball: every changeable feature at ``±eps`` (linf) or ``±eps/sqrt(m)``
        (l2), random signs."""
        size = self.threat.eps if self.threat.norm == "linf" else self.threat.eps / math.sqrt(m)
        signs = self._signs(tuple(state.x.shape), direction.expand_as(state.x), generator, state.x)
        return signs * size * mutable

    def _propose(
        self,
        state: _State,
        mutable: Tensor,
        direction: Tensor,
        m: int,
        iteration: int,
        generator: torch.Generator | None,
    ) -> Tensor:
        """The next perturbation: ``k`` random changeable features of each point moved to a
        vertex (see the module's docstring)."""
        n, width = state.x.shape
        k = max(1, min(m, round(p_selection(self.p_init, iteration, self.n_queries) * m)))
        linf = self.threat.norm == "linf"
        drawn = min(k if linf else 2 * k, m)
        scores = torch.rand((n, width), generator=generator, device=state.x.device)
        scores = scores.masked_fill(~mutable, -1.0)
        order = scores.topk(drawn, dim=1).indices
        chosen, emptied = order[:, :k], order[:, k:]
        delta = state.cur - state.x
        signs = self._signs((n, k), direction[chosen], generator, state.x)
        if linf:
            new = signs * self.threat.eps
            same = (delta.gather(1, chosen).sign() == signs).all(1)  # already at that vertex
            if bool(same.any()):  # flip a non-empty subset of the signs, as Square redraws
                flips = nonempty_subsets(n, k, generator, state.x)
                flipped = torch.where((flips > 0) & (direction[chosen] == 0), -new, new)
                new = torch.where(same[:, None], flipped, new)
            return delta.scatter(1, chosen, new)
        delta = delta.scatter(1, emptied, 0.0).scatter(1, chosen, 0.0)
        rest = delta.square().sum(1, keepdim=True)
        budget = (self.threat.eps**2 - rest).clamp_min(0).sqrt()
        return delta.scatter(1, chosen, signs * budget / math.sqrt(k))

    def _query(
        self,
        model: nn.Module,
        state: _State,
        candidate: Tensor,
        best: Outcome,
        shape: torch.Size,
        first: bool,
    ) -> _State:
        """Query the model on the candidates that differ from the current points, count the
        queries, keep the improvements (the start whatever its loss, as in Square), write the
        points that became adversarial into ``best``; returns the state of the others."""
        changed = (candidate != state.cur).any(1)
        if not bool(changed.any()):
            return state
        rows = changed.nonzero().squeeze(1)
        picked = candidate[rows]
        y = state.y[rows]
        target = None if state.target is None else state.target[rows]
        logits = model(picked.reshape(len(rows), *shape[1:])).float()
        loss = self._objective(logits, y, target)
        adversarial = is_adversarial(logits, y, target)
        assert best.queries is not None
        best.queries[state.index[rows]] += 1
        accept = adversarial | (loss > state.loss[rows]) | first
        taken = rows[accept]
        state.cur[taken] = picked[accept]
        state.loss[taken] = loss[accept]
        if not bool(adversarial.any()):
            return state
        won = rows[adversarial]
        done = state.index[won]
        best.x_adv[done] = picked[adversarial].reshape(len(won), *shape[1:])
        best.success[done] = True
        best.loss[done] = loss[adversarial].to(best.loss.dtype)
        left = torch.ones(len(state.index), dtype=torch.bool, device=changed.device)
        left[won] = False
        return state.keep(left)


__all__ = ["FEATURE_SEARCH_LOSSES", "FeatureSearch"]
