"""The Square attack: a score-based black-box attack by random search, for linf and l2.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box adversarial
attack via random search" (ECCV 2020). It sees only the model's outputs (every forward pass runs
under ``torch.no_grad()``). From a start on the boundary of the ball (linf: vertical stripes of
``±eps``; l2: a grid of ``±`` bumps scaled to norm eps) it repeats: propose a change inside a
random square window, query the model, keep the change only when the loss improves (or the point
becomes adversarial).

- linf: the window is set to ``x ± eps``, one random sign per channel; a proposal that would not
  change the point is redrawn over the other sign patterns (as in the authors' code), so no query
  is wasted on it.
- l2: a pseudo-Gaussian bump (``+`` on one half of the window, ``-`` on the other) is added to the
  window's normalised content, the content of a second random window is moved into it, and the
  whole perturbation is rescaled to norm eps.

The side of the window follows ``p``, the fraction of features a proposal changes: ``p_init``
halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of a 10,000-query run,
rescaled to the budget (side ``round(sqrt(p * H * W))``, at least 1 for linf, odd and at least 3
for l2). Defaults are the paper's and AutoAttack's: ``n_queries=5000``, ``p_init=0.8``,
``loss="margin"`` (the CW margin; ``"ce"`` for cross-entropy); targeted runs maximise the
cross-entropy of the target, as AutoAttack does. Every forward pass counts as a query, the check of
the clean point included, so no point uses more than ``n_queries`` per run;
``Square(...).outcome(model, x, y).queries`` gives the count of each point, summed over restarts.

Unlike the authors' code, a linf query puts its window at the same random place in every point
(theirs draws one place per point in a loop; for each point on its own the windows are uniform
and independent either way, and nothing a point does depends on the others), the l2 windows are
drawn per point, and a window may sit anywhere in the plane (theirs never covers the last row
and column). A point leaves the search as soon as it is adversarial, so each iteration is one
forward pass over the points still standing (on an accelerator the points that leave are dropped
every :func:`~advtrain.device_sync.compaction_interval` iterations, with no read-back to the host
in between). How a query runs the model is a strategy (``forward``,
:mod:`~advtrain.attacks.square_forward`): by default, for linf on the CPU, when the model is a
convolutional ``nn.Sequential``, a query recomputes only the feature-map patches its window
reaches, where that saves a third of the work.
With ``give_up`` (:class:`~advtrain.attacks.give_up.GiveUp`) an untargeted run stops spending
queries on points whose margin, at a few checkpoints, is further from zero than its progress can
plausibly cover (A3's budget allocation, Liu et al. 2022); the default spends every query.
Inputs ``(N, D)`` and ``(N, C, L)`` are searched with 1-D windows (a run of ``round(p * D)``
contiguous features); immutable features (the threat model's mask) and per-feature bounds are
honoured exactly.

Example:
    >>> x_adv = Square(eps=0.3)(model, x, y)                       # linf, 5000 queries
    >>> x_adv = Square(norm="l2", eps=2.0, n_queries=1000)(model, x, y)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..losses import is_adversarial
from ..threat import ThreatModel
from .base import Outcome, compaction_interval, put_rows
from .fast_grad import suspended
from .give_up import GiveUp, ProgressWatch
from .random_search import RANDOM_SEARCH_LOSSES, RandomSearch
from .registry import register
from .square_forward import QueryForward, QueryPass, Window, WindowQueries
from .square_geometry import (
    eta,
    nonempty_subsets,
    p_selection,
    plane_shape,
    random_corners,
    random_signs,
    tile_starts,
    window_indices,
    window_mask,
    window_shape,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .base import AttackOptions

SQUARE_LOSSES = RANDOM_SEARCH_LOSSES


@dataclass
class SearchState:
    """The per-sample state of one search, on the points still in it (rows ``index`` of the
    batch); the points are planes ``(n, C, H, W)``."""

    index: Tensor  # rows of the batch
    x: Tensor  # the clean points
    y: Tensor
    target: Tensor | None
    plus: Tensor | None  # linf: the coordinates x + eps and x - eps may take (bounds, mask)
    minus: Tensor | None
    cur: Tensor  # the current points
    loss: Tensor  # their loss (-inf: never queried)
    active: Tensor  # bool: not yet adversarial (the others wait for the next compaction)
    maps: list[Tensor] = field(default_factory=list)  # the query pass's per-sample state

    def keep(self, rows: Tensor) -> SearchState:
        """The state of the rows flagged in ``rows`` (one read-back to the host); itself when
        every row stays."""
        index = rows.nonzero().squeeze(1)
        if len(index) == len(rows):
            return self

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return SearchState(
            self.index[index],
            self.x[index],
            self.y[index],
            pick(self.target),
            pick(self.plus),
            pick(self.minus),
            self.cur[index],
            self.loss[index],
            self.active[index],
            [m[index] for m in self.maps],
        )


@dataclass(frozen=True)
class _Box:
    """Lower and upper bounds and mutable features, shaped like one sample of the planes."""

    lower: Tensor
    upper: Tensor
    mutable: Tensor


def _per_sample(values: Tensor) -> Tensor:
    return values.reshape(-1, 1, 1, 1)


@register("square")
class Square(RandomSearch):
    """The Square attack (Andriushchenko et al. 2020), score-based black-box, linf or l2.

    Args:
        threat: the threat model (linf or l2), or ``norm``/``eps``/bounds/mask as keywords.
        n_queries: model queries per point and run (default 5000), the clean check included.
        p_init: initial fraction of features a proposal changes (default 0.8).
        loss: ``"margin"`` (CW margin, default) or ``"ce"``, for untargeted runs; targeted runs
            maximise minus the cross-entropy of the target.
        forward: how a query runs the model
            (:class:`~advtrain.attacks.square_forward.QueryForward`; default
            :class:`~advtrain.attacks.square_forward.WindowQueries`, the window pass where the
            model allows it; :class:`~advtrain.attacks.square_forward.FullQueries`: always the
            model's own forward pass). The result is the same either way.
        give_up: drop points judged hopeless at a few checkpoints of an untargeted run
            (:class:`~advtrain.attacks.give_up.GiveUp`, after A3, Liu et al. 2022; margin loss
            only); ``None`` (default) spends every query, as the paper does.
        restarts, batch_size, seed: see :class:`~advtrain.attacks.base.Attack`.

    The queries each point used are on :meth:`outcome`'s result (``.queries``, int64, summed over
    restarts).
    """

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        n_queries: int = 5000,
        p_init: float = 0.8,
        loss: str = "margin",
        forward: QueryForward | None = None,
        give_up: GiveUp | None = None,
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(threat, n_queries=n_queries, p_init=p_init, loss=loss, **options)
        if forward is not None and not isinstance(forward, QueryForward):
            raise AdvtrainError(
                f"forward must be a QueryForward (WindowQueries, FullQueries), got {forward!r}"
            )
        if give_up is not None and not isinstance(give_up, GiveUp):
            raise AdvtrainError(f"give_up must be a GiveUp or None, got {give_up!r}")
        if give_up is not None and loss != "margin":
            raise AdvtrainError(f"give_up judges the margin loss; got loss={loss!r}")
        self.forward: QueryForward = WindowQueries() if forward is None else forward
        self.give_up = give_up

    def _hyperparameters(self) -> dict[str, object]:
        return {**super()._hyperparameters(), "give_up": self.give_up}

    # ------------------------------------------------------------------ the search
    def run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        n, sample = len(x), tuple(x.shape[1:])
        plane = plane_shape(sample)
        queries = torch.zeros(n, dtype=torch.int64, device=x.device)
        with torch.no_grad(), suspended():
            logits = model(x)
            queries += 1
            success = is_adversarial(logits, y, target)
            best = Outcome(x.clone(), success, self._objective(logits, y, target), queries)
            if self.threat.eps > 0 and self.n_queries > 1 and not bool(success.all()):
                self._search(model, x.reshape(n, *plane), y, target, best, generator)
        return best

    def _box(self, x: Tensor, sample: tuple[int, ...]) -> _Box:
        """The bounds and mutable features of inputs shaped ``sample``, reshaped like one sample
        of the planes ``x``."""
        plane = (1, *x.shape[1:])
        threat = self.threat
        lower, upper = (
            torch.as_tensor(b, dtype=x.dtype, device=x.device).expand(sample).reshape(plane)
            for b in (threat.lower, threat.upper)
        )
        mutable = (
            torch.ones(plane, dtype=torch.bool, device=x.device)
            if threat.mask is None
            else threat.mask.to(x.device).expand(sample).reshape(plane)
        )
        return _Box(lower, upper, mutable)

    def _search(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        best: Outcome,
        generator: torch.Generator | None,
    ) -> None:
        """Random search on the points of ``best`` not yet adversarial; ``x`` is shaped
        ``(N, C, H, W)`` (planes), and ``best`` (its queries included) is updated in place.

        One query path: the points that become adversarial are written into ``best`` and made
        inactive at once, and dropped from the state every
        :func:`~advtrain.device_sync.compaction_interval` iterations (every iteration on the CPU,
        where a query then runs on the changed points only; elsewhere every row is queried and
        nothing is read back to the host in between)."""
        eps, linf = self.threat.eps, self.threat.norm == "linf"
        shape = best.x_adv.shape
        box = self._box(x, tuple(shape[1:]))
        # Per point, the coordinates the search may set: x ± eps clamped into the bounds (linf),
        # and whether any feature can move at all; points that cannot move are left alone.
        plus = torch.where(box.mutable, torch.minimum(x + eps, box.upper), x)
        minus = torch.where(box.mutable, torch.maximum(x - eps, box.lower), x)
        movable = (plus != minus).flatten(1).any(1)
        rows = (~best.success & movable).nonzero().squeeze(1)
        if len(rows) == 0:
            return
        every = compaction_interval(x.device)
        dense = every > 1
        constrained = self.threat.constraints is not None
        forward = self.forward.open(
            model, x[rows], tuple(shape[1:]), windowed=linf and not dense and not constrained
        )
        state = SearchState(
            index=rows,
            x=x[rows],
            y=y[rows],
            target=None if target is None else target[rows],
            plus=plus[rows] if linf else None,
            minus=minus[rows] if linf else None,
            cur=x[rows].clone(),
            loss=torch.full((len(rows),), float("-inf"), device=x.device),
            active=torch.ones(len(rows), dtype=torch.bool, device=x.device),
        )
        state.maps = forward.start(state.x)  # at first, those of the clean points
        first = (
            self._start_linf(state, generator) if linf else self._start_l2(state, box, generator)
        )
        watch: ProgressWatch | None = None
        if self.give_up is not None and target is None:
            watch = self.give_up.watch(self.n_queries, len(best.x_adv), x.device)
        for i in range(-1, self.n_queries - 2):
            if len(state.index) == 0:
                break
            window = None
            if i == -1:  # the start is taken whatever its loss, as in the authors' code
                candidate, changed = first, (first != state.x).flatten(1).any(1)
            elif linf:
                candidate, changed, window = self._propose_linf(state, i, generator, dense)
            else:
                candidate, changed = self._propose_l2(state, i, box, generator)
            if constrained:  # a table's constraints: every query is a feasible row
                candidate, changed, window = self._repaired(state, candidate, shape)
            self._query(forward, state, candidate, changed, window, best, dense)
            if watch is not None:  # every point has now used i + 3 queries at most
                hopeless = watch.after(i + 3, state.index, state.loss, state.active)
                if hopeless is not None:
                    self._drop(state, hopeless, best)
            if (i + 2) % every == 0:
                state = state.keep(state.active)
        index, active = state.index, state.active
        if len(index):
            kept = active.reshape((-1,) + (1,) * (len(shape) - 1))
            best.x_adv[index] = torch.where(
                kept, state.cur.reshape(len(index), *shape[1:]), best.x_adv[index]
            )
            queried = active & (state.loss > float("-inf"))  # else never moved: keep its loss
            best.loss[index] = torch.where(queried, state.loss, best.loss[index])

    @staticmethod
    def _drop(state: SearchState, rows: Tensor, best: Outcome) -> None:
        """Give up on the flagged rows: their current points and losses are their results."""
        points = state.cur.reshape(len(state.cur), *best.x_adv.shape[1:])
        put_rows(best.x_adv, state.index, rows, points)
        put_rows(best.loss, state.index, rows, state.loss)
        state.active = state.active & ~rows

    def _repaired(
        self, state: SearchState, candidate: Tensor, shape: torch.Size
    ) -> tuple[Tensor, Tensor, None]:
        """Candidates repaired by the threat model's projection (integers, one-hot groups,
        directions, rules), which may move them beyond a window: every row is queried whole."""
        flat = (len(candidate), *shape[1:])
        repaired = self.threat.project(candidate.reshape(flat), state.x.reshape(flat))
        repaired = repaired.reshape(candidate.shape)
        return repaired, (repaired != state.cur).flatten(1).any(1), None

    def _query(
        self,
        forward: QueryPass,
        state: SearchState,
        candidate: Tensor,
        changed: Tensor,
        window: Window | None,
        best: Outcome,
        dense: bool,
    ) -> None:
        """Query the model on the active candidates that differ from the current points
        (``changed``), count the queries, keep the improvements, and write the points that
        became adversarial into ``best`` and make them inactive, all in place. ``dense``: every
        row goes through the model and nothing is read back to the host; otherwise only the
        changed rows do, and the pass keeps its state of the accepted ones."""
        changed = changed & state.active
        rows = None
        if not dense:
            if not bool(changed.any()):
                return
            rows = None if bool(changed.all()) else changed.nonzero().squeeze(1)
        picked = candidate if rows is None else candidate[rows]
        y = state.y if rows is None else state.y[rows]
        target = state.target if state.target is None or rows is None else state.target[rows]
        maps = state.maps if rows is None else [m[rows] for m in state.maps]
        logits, pending = forward.logits(picked, maps, window, y, target)
        objective, adversarial = (
            self._objective(logits, y, target),
            is_adversarial(logits, y, target),
        )
        if rows is None:
            loss = objective.masked_fill(~changed, float("-inf"))
            success = adversarial & changed
        else:
            loss = torch.full_like(state.loss, float("-inf"))
            success = torch.zeros_like(changed)
            loss[rows], success[rows] = objective, adversarial
        assert best.queries is not None
        best.queries[state.index] += changed.to(best.queries.dtype)
        accept = (success | (loss > state.loss)) & changed
        state.cur = torch.where(_per_sample(accept), candidate, state.cur)
        state.loss = torch.where(accept, loss, state.loss)
        if state.maps and not dense:
            taken = accept.nonzero().squeeze(1)
            if len(taken):
                mine = taken if rows is None else accept[rows].nonzero().squeeze(1)
                forward.commit(state.maps, pending, mine, taken)
        points = candidate.reshape(len(candidate), *best.x_adv.shape[1:])
        put_rows(best.x_adv, state.index, success, points)
        put_rows(best.success, state.index, success, success)
        put_rows(best.loss, state.index, success, loss)
        state.active = state.active & ~success

    # ------------------------------------------------------------------ linf
    def _start_linf(self, state: SearchState, generator: torch.Generator | None) -> Tensor:
        """Vertical stripes: one random sign per channel and column, ``x ± eps`` in bounds."""
        assert state.plus is not None and state.minus is not None
        n, c, _, w = state.x.shape
        signs = random_signs((n, c, 1, w), generator, state.x)
        return torch.where(signs > 0, state.plus, state.minus)

    def _propose_linf(
        self,
        state: SearchState,
        iteration: int,
        generator: torch.Generator | None,
        dense: bool = False,
    ) -> tuple[Tensor, Tensor, Window]:
        """Set a random window to ``x ± eps`` (a random sign per point and channel). Where that
        would leave the point unchanged, flip a uniformly drawn non-empty subset of the channels'
        signs instead: the authors' redraw until something changes, in one step. Works on the
        windows only (gather/scatter); returns the candidates and which of them changed.
        ``dense``: draw the flips for every point and pick them where needed, with no read-back
        to the host. Also returns the window (top row, left column, size). The window sits at
        the same place in every point: each point's sequence of windows is still uniform and
        independent, as in the paper, and the window pass works on slices."""
        cur, plus_all, minus_all = state.cur, state.plus, state.minus
        assert plus_all is not None and minus_all is not None
        n, c, h, w = cur.shape
        size = window_shape(p_selection(self.p_init, iteration, self.n_queries), h, w, "linf")
        top, left = random_corners(1, h, w, size, generator, cur.device)  # one for all points
        index = window_indices(top, left, (c, h, w), size).expand(n, -1)
        old = cur.reshape(n, -1).gather(1, index)
        plus = plus_all.reshape(n, -1).gather(1, index).reshape(n, c, -1)
        minus = minus_all.reshape(n, -1).gather(1, index).reshape(n, c, -1)
        signs = random_signs((n, c, 1), generator, cur)
        new = torch.where(signs > 0, plus, minus).reshape(n, -1)
        changed = (new != old).any(1)
        if dense:
            flips = nonempty_subsets(n, c, generator, cur).reshape(n, c, 1)
            redrawn = torch.where(signs * (1 - 2 * flips) > 0, plus, minus).reshape(n, -1)
            new = torch.where(changed[:, None], new, redrawn)
            changed = (new != old).any(1)
        elif not bool(changed.all()):
            rows = (~changed).nonzero().squeeze(1)
            flips = nonempty_subsets(len(rows), c, generator, cur).reshape(len(rows), c, 1)
            signs = signs[rows] * (1 - 2 * flips)
            new[rows] = torch.where(signs > 0, plus[rows], minus[rows]).reshape(len(rows), -1)
            changed = (new != old).any(1)
        candidate = cur.reshape(n, -1).scatter(1, index, new).reshape(cur.shape)
        return candidate, changed, (top, left, size)

    # ------------------------------------------------------------------ l2
    def _start_l2(self, state: SearchState, box: _Box, generator: torch.Generator | None) -> Tensor:
        """A grid of bumps (tiles of a fifth of the side, centred), a random sign per sample,
        channel and tile, scaled to norm eps (Andriushchenko et al. 2020)."""
        x = state.x
        n, c, h, w = x.shape
        delta = torch.zeros_like(x)
        if h == 1:
            side = (1, max(w // 5, 1))
            tops, lefts = [0], tile_starts(w, side[1])
        else:
            s = max(min(h, w) // 5, 1)
            side = (s, s)
            tops, lefts = tile_starts(h, s), tile_starts(w, s)
        shape = eta(*side).to(x.device, x.dtype)
        for top in tops:
            for left in lefts:
                flip = bool(h > 1 and torch.rand(1, generator=generator, device=x.device) > 0.5)
                tile = (shape.T if flip else shape)[: h - top, : w - left]
                signs = random_signs((n, c, 1, 1), generator, x)
                delta[:, :, top : top + side[0], left : left + side[1]] += tile * signs
        return self._finish_l2(x, delta, box)

    def _finish_l2(self, x: Tensor, delta: Tensor, box: _Box) -> Tensor:
        """Mask the perturbation, rescale it to norm eps, clamp the point into the bounds."""
        delta = delta * box.mutable
        norms = delta.flatten(1).norm(dim=1)
        scale = torch.where(norms > 0, self.threat.eps / norms.clamp_min(1e-12), 0.0)
        return torch.minimum(torch.maximum(x + delta * _per_sample(scale), box.lower), box.upper)

    def _propose_l2(
        self, state: SearchState, iteration: int, box: _Box, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Replace window 1 by a bump plus its normalised content and empty window 2, giving
        window 1 the mass of both and the unused budget, then rescale to norm eps."""
        x, cur = state.x, state.cur
        n, c, h, w = x.shape
        size = window_shape(p_selection(self.p_init, iteration, self.n_queries), h, w, "l2")
        corners = [random_corners(n, h, w, size, generator, x.device) for _ in range(2)]
        first, rows, cols = window_mask(*corners[0], h, w, size)
        second, _, _ = window_mask(*corners[1], h, w, size)
        both = first | second
        delta = cur - x
        in_first = delta * first
        norm_first = in_first.square().sum((2, 3), keepdim=True).sqrt()
        norm_total2 = delta.square().sum((1, 2, 3), keepdim=True)
        norm_both2 = (delta * both).square().sum((2, 3), keepdim=True)
        # The bump at each window, transposed for a random half of the points (square windows).
        shapes = eta(*size).to(x.device, x.dtype)
        shapes = torch.stack([shapes, shapes.T]) if size[0] == size[1] else shapes[None]
        pick = torch.randint(0, len(shapes), (n,), generator=generator, device=x.device)
        placed = shapes[
            pick[:, None, None],
            rows.clamp(0, size[0] - 1)[:, :, None],
            cols.clamp(0, size[1] - 1)[:, None, :],
        ]
        new = placed[:, None] * first * random_signs((n, c, 1, 1), generator, x)
        new = new + in_first / norm_first.clamp_min(1e-12)
        budget = ((self.threat.eps**2 - norm_total2).clamp_min(0) / c + norm_both2).sqrt()
        new = new / new.square().sum((2, 3), keepdim=True).sqrt().clamp_min(1e-12) * budget
        candidate = self._finish_l2(x, torch.where(both, 0.0, delta) + new, box)
        return candidate, (candidate != cur).flatten(1).any(1)
