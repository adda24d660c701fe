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
the clean point included, so no point uses more than ``n_queries`` per run; the count of the last
call is in :attr:`Square.queries_used`.

Unlike the authors' code, a linf query puts its window at the same random place in every point
(theirs draws one place per point in a loop; for each point on its own the windows are uniform
and independent either way, and nothing a point does depends on the others), the l2 windows are
drawn per point, and a window may sit anywhere in the plane (theirs never covers the last row
and column). A point leaves the search as soon as it is adversarial, so each iteration is one
forward pass over the points still standing. For linf on the CPU, when the model is a
convolutional ``nn.Sequential``, a query recomputes only the feature-map patches its window
reaches (:mod:`~advtrain.attacks.window_forward`) where that saves a third of the work.
Inputs ``(N, D)`` and ``(N, C, L)`` are searched with 1-D windows (a run of ``round(p * D)``
contiguous features); immutable features (the threat model's mask) and per-feature bounds are
honoured exactly.

Example:
    >>> x_adv = Square(eps=0.3)(model, x, y)                       # linf, 5000 queries
    >>> x_adv = Square(norm="l2", eps=2.0, n_queries=1000)(model, x, y)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..losses import cross_entropy, cw_margin, is_adversarial
from ..threat import ThreatModel
from ..util import check_positive_int
from .base import Attack, Outcome, compaction_interval
from .fast_grad import suspended
from .registry import register
from .window_forward import MAX_MAP_BYTES, Change, WindowForward

#: Iterations of a 10,000-query run after which ``p`` is halved (Andriushchenko et al. 2020).
P_MILESTONES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
SQUARE_LOSSES = ("margin", "ce")


def p_selection(p_init: float, iteration: int, n_queries: int) -> float:
    """The fraction of features changed at ``iteration``: ``p_init`` halved at each milestone
    passed, with the milestones rescaled from 10,000 queries to ``n_queries``."""
    scaled = int(iteration / n_queries * 10000)
    return p_init / 2 ** sum(scaled > m for m in P_MILESTONES)


def window_shape(p: float, h: int, w: int, norm: str) -> tuple[int, int]:
    """Height and width of the window changing a fraction ``p`` of an ``h x w`` plane.

    A square of side ``round(sqrt(p * h * w))`` (at least 1 for linf; odd and at least 3 for l2),
    or a run of ``round(p * w)`` features when the plane is a single row; never larger than the
    plane.
    """
    side = round(p * w) if h == 1 else round(math.sqrt(p * h * w))
    if norm == "l2":
        side = max(side, 3)
        side += 1 - side % 2
    side = max(side, 1)
    return (1, min(side, w)) if h == 1 else (min(side, h, w),) * 2


def bump(rows: int, cols: int) -> Tensor:
    """Concentric rectangles of weights ``1 / (k + 1)^2`` (a pseudo-Gaussian), unit l2 norm.

    The cell at Chebyshev distance ``d`` from the centre gets the weights of the rings
    ``k = d, ..., K - 1``, ``K = max(rows, cols) // 2 + 1`` (Andriushchenko et al. 2020).
    """
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols)
    rings = max(rows // 2, cols // 2) + 1
    weights = 1.0 / torch.arange(1, rings + 1, dtype=torch.float64) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = sum of the rings k >= d
    down = (torch.arange(rows) - rows // 2).abs()
    across = (torch.arange(cols) - cols // 2).abs()
    dist = torch.maximum(down[:, None], across[None])
    values = tail[dist]
    return (values / values.norm()).float()


def eta(rows: int, cols: int) -> Tensor:
    """The l2 proposal shape: a bump on the first half of the window and minus a bump on the
    second half (halves of rows, or of columns for a single-row window), unit l2 norm."""
    if rows == 1:
        half = cols // 2
        shape = torch.cat([bump(1, half), -bump(1, cols - half)], dim=1)
    else:
        half = rows // 2
        shape = torch.cat([bump(half, cols), -bump(rows - half, cols)], dim=0)
    return shape / shape.norm()


def plane_shape(sample_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(C, H, W)`` of the planes the windows move on: ``(D,) -> (1, 1, D)``,
    ``(C, L) -> (C, 1, L)``, ``(C, H, 1) -> (C, 1, H)``, ``(C, H, W)`` unchanged."""
    if len(sample_shape) == 1:
        return (1, 1, sample_shape[0])
    if len(sample_shape) == 2:
        return (sample_shape[0], 1, sample_shape[1])
    if len(sample_shape) == 3:
        c, h, w = sample_shape
        return (c, 1, h) if w == 1 else (c, h, w)
    raise AdvtrainError(
        "Square takes inputs of shape (N, D), (N, C, L) or (N, C, H, W), got "
        f"{sample_shape} per sample"
    )


def random_corners(
    n: int,
    h: int,
    w: int,
    size: tuple[int, int],
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Top row and left column of one window of ``size`` per sample, uniform over the plane."""
    top = torch.randint(0, h - size[0] + 1, (n,), generator=generator, device=device)
    left = torch.randint(0, w - size[1] + 1, (n,), generator=generator, device=device)
    return top, left


def window_mask(
    top: Tensor, left: Tensor, h: int, w: int, size: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """The mask ``(n, 1, h, w)`` of each sample's window, and the row and column of every pixel
    relative to the window's corner, ``(n, h)`` and ``(n, w)``."""
    rows = torch.arange(h, device=top.device) - top[:, None]
    cols = torch.arange(w, device=top.device) - left[:, None]
    in_rows = (rows >= 0) & (rows < size[0])
    in_cols = (cols >= 0) & (cols < size[1])
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None], rows, cols


def window_indices(
    top: Tensor, left: Tensor, shape: tuple[int, int, int], size: tuple[int, int]
) -> Tensor:
    """Flat indices ``(n, c * sh * sw)`` of each sample's window in its flattened ``(c, h, w)``
    plane, channel by channel, for ``gather``/``scatter``."""
    c, h, w = shape
    device = top.device
    offsets = (
        torch.arange(size[0], device=device)[:, None] * w + torch.arange(size[1], device=device)
    ).flatten()
    channels = torch.arange(c, device=device)[:, None] * (h * w)
    corner = (top * w + left)[:, None, None]
    return (corner + channels + offsets).reshape(len(top), -1)


def random_signs(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Independent ``±1`` of ``like``'s dtype and device."""
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (bits * 2 - 1).to(like.dtype)


def _keep(state: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """The per-sample state of the rows still being attacked (one read-back to the host)."""
    index = rows.nonzero().squeeze(1)
    return {key: value[index] for key, value in state.items()}


def _per_sample(values: Tensor) -> Tensor:
    return values.reshape(-1, 1, 1, 1)


@register("square")
class Square(Attack):
    """The Square attack (Andriushchenko et al. 2020), score-based black-box, linf or l2.

    Args:
        threat: the threat model (linf or l2), or ``norm``/``eps``/bounds/mask as keywords.
        n_queries: model queries per point and run (default 5000), the clean check included.
        p_init: initial fraction of features a proposal changes (default 0.8).
        loss: ``"margin"`` (CW margin, default) or ``"ce"``, for untargeted runs; targeted runs
            maximise minus the cross-entropy of the target.
        restarts, batch_size, seed: see :class:`~advtrain.attacks.base.Attack`.

    Attributes:
        queries_used: after a call, the queries spent on each of its points (int64, CPU), summed
            over restarts.
    """

    norms = ("linf", "l2")
    #: linf on a convolutional ``nn.Sequential`` (CPU): recompute only the feature-map patches a
    #: proposal's window reaches (:mod:`~advtrain.attacks.window_forward`).
    _window_forward = True

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        n_queries: int = 5000,
        p_init: float = 0.8,
        loss: str = "margin",
        **kwargs: object,
    ) -> None:
        super().__init__(threat, **kwargs)  # type: ignore[arg-type]
        check_positive_int("n_queries", n_queries)
        if isinstance(p_init, bool) or not isinstance(p_init, (int, float)) or not 0 < p_init <= 1:
            raise AdvtrainError(f"p_init must be in (0, 1], got {p_init!r}")
        if loss not in SQUARE_LOSSES:
            raise AdvtrainError(f"unknown loss {loss!r}; choose one of: {', '.join(SQUARE_LOSSES)}")
        self.n_queries, self.p_init, self.loss = n_queries, float(p_init), loss
        self.queries_used: Tensor = torch.zeros(0, dtype=torch.int64)
        self._runs: list[tuple[Tensor, Tensor]] = []
        self._batches: list[Tensor] = []

    def _hyperparameters(self) -> dict[str, object]:
        return {
            **super()._hyperparameters(),
            "n_queries": self.n_queries,
            "p_init": self.p_init,
            "loss": self.loss,
        }

    # ------------------------------------------------------------------ query bookkeeping
    @property
    def screens_clean_points(self) -> bool:
        return False  # the clean point is the search's first query, counted in its budget

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, *, target: Tensor | None = None
    ) -> Tensor:
        self._batches = []
        try:
            return super().__call__(model, x, y, target=target)
        finally:
            self.queries_used = (
                torch.cat(self._batches) if self._batches else torch.zeros(0, dtype=torch.int64)
            )
            self._batches, self._runs = [], []

    def _restarts(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        """The base's restarts, then the queries of each run added to the rows it attacked
        (run k attacks the rows that no earlier run broke)."""
        self._runs = []
        best = super()._restarts(model, x, y, target, generator)
        used = torch.zeros(len(x), dtype=torch.int64)
        broken = torch.zeros(len(x), dtype=torch.bool)
        for queries, success in self._runs:
            rows = (~broken).nonzero().squeeze(1)
            used[rows] += queries
            broken[rows] |= success
        self._batches.append(used)
        return best

    # ------------------------------------------------------------------ the search
    def _objective(self, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        if target is not None:
            return -cross_entropy(logits, target)
        return cw_margin(logits, y) if self.loss == "margin" else cross_entropy(logits, y)

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
            best = Outcome(x.clone(), success, self._objective(logits, y, target))
            if self.threat.eps > 0 and self.n_queries > 1 and not bool(success.all()):
                self._search(model, x.reshape(n, *plane), y, target, best, queries, generator)
        self._runs.append((queries.cpu(), best.success.cpu().clone()))  # merges edit best
        return best

    def _geometry(self, x: Tensor, sample: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """Lower and upper bounds and the mutable features of inputs shaped ``sample``, reshaped
        like one sample of the planes ``x``."""
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
        return lower, upper, mutable

    def _search(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        best: Outcome,
        queries: Tensor,
        generator: torch.Generator | None,
    ) -> None:
        """Random search on the points of ``best`` not yet adversarial; ``x`` is shaped
        ``(N, C, H, W)`` (planes), and ``best`` and ``queries`` are updated in place."""
        eps, linf = self.threat.eps, self.threat.norm == "linf"
        shape = best.x_adv.shape
        lower, upper, mutable = self._geometry(x, tuple(shape[1:]))
        # Per point, the coordinates the search may set: x ± eps clamped into the bounds (linf),
        # and whether any feature can move at all; points that cannot move are left alone.
        plus = torch.where(mutable, torch.minimum(x + eps, upper), x)
        minus = torch.where(mutable, torch.maximum(x - eps, lower), x)
        movable = (plus != minus).flatten(1).any(1)
        state = {"index": torch.arange(len(x), device=x.device), "x": x, "y": y}
        if target is not None:
            state["target"] = target
        if linf:
            state["plus"], state["minus"] = plus, minus
        state = _keep(state, ~best.success & movable)
        if len(state["index"]) == 0:
            return
        every = compaction_interval(x.device)
        local = None
        if linf and every == 1 and self._window_forward and tuple(x.shape) == tuple(shape):
            local = WindowForward.build(model, tuple(shape[1:]))
            if local is not None and local.map_bytes(state["x"]) > MAX_MAP_BYTES:
                local = None
        if local is not None:  # the feature maps of the current points (at first, the clean ones)
            state.update({f"map{k}": m for k, m in enumerate(local.start(state["x"])[1])})
        context = (lower, upper, mutable, generator)
        first = self._start_linf(state, generator) if linf else self._start_l2(state, context)
        state["cur"] = state["x"].clone()
        state["loss"] = torch.full((len(first),), float("-inf"), device=x.device)
        # On an accelerator the points that became adversarial stay in the batch, inactive, and
        # are dropped every few iterations only: no read-back to the host in between.
        state["active"] = torch.ones(len(first), dtype=torch.bool, device=x.device)
        for i in range(-1, self.n_queries - 2):
            if len(state["index"]) == 0:
                break
            window = None
            if i == -1:  # the start is taken whatever its loss, as in the authors' code
                candidate, changed = first, (first != state["x"]).flatten(1).any(1)
            elif linf:
                candidate, changed, window = self._propose_linf(state, i, generator, every > 1)
            else:
                candidate, changed = self._propose_l2(state, i, context)
            if every == 1:
                state = self._query(
                    model, state, candidate, changed, best, queries, shape, local, window
                )
            else:
                self._query_all(model, state, candidate, changed, best, queries, shape)
                if (i + 2) % every == 0:
                    state = _keep(state, state["active"])
        index, active = state["index"], state["active"]
        if len(index):
            rows = active.reshape((-1,) + (1,) * (len(shape) - 1))
            best.x_adv[index] = torch.where(
                rows, state["cur"].reshape(len(index), *shape[1:]), best.x_adv[index]
            )
            queried = active & (state["loss"] > float("-inf"))  # else never moved: keep its loss
            best.loss[index] = torch.where(queried, state["loss"], best.loss[index])

    def _query(
        self,
        model: nn.Module,
        state: dict[str, Tensor],
        candidate: Tensor,
        changed: Tensor,
        best: Outcome,
        queries: Tensor,
        shape: torch.Size,
        local: WindowForward | None = None,
        window: tuple[Tensor, Tensor, tuple[int, int]] | None = None,
    ) -> dict[str, Tensor]:
        """Query the model on the candidates that differ from the current points (``changed``);
        keep the improvements; write the points that became adversarial into ``best`` and drop
        them from the state. With ``local``, the feature maps of the current points are kept in
        the state, and where it pays the forward pass recomputes only what the proposal's
        ``window`` reaches."""
        if not bool(changed.any()):
            return state
        target = state.get("target")
        rows = None if bool(changed.all()) else changed.nonzero().squeeze(1)
        picked = candidate if rows is None else candidate[rows]
        y = state["y"] if rows is None else state["y"][rows]
        wanted = target if target is None or rows is None else target[rows]
        state_maps = [] if local is None else [state[f"map{k}"] for k in range(local.n_maps)]
        maps = state_maps if rows is None else [m[rows] for m in state_maps]
        logits, change, new_maps = self._forward(
            model, picked, y, wanted, maps, shape, local, window
        )
        if rows is None:
            loss = self._objective(logits, y, wanted)
            success = is_adversarial(logits, y, wanted)
        else:
            loss = torch.full_like(state["loss"], float("-inf"))
            success = torch.zeros_like(changed)
            loss[rows] = self._objective(logits, y, wanted)
            success[rows] = is_adversarial(logits, y, wanted)
        queries[state["index"]] += changed.to(queries.dtype)
        accept = (success | (loss > state["loss"])) & changed
        if bool(accept.any()):
            taken = accept.nonzero().squeeze(1)
            state["cur"][taken] = candidate[taken]
            state["loss"] = torch.where(accept, loss, state["loss"])
            if local is not None:  # the rows of `picked` taken
                mine = taken if rows is None else accept[rows].nonzero().squeeze(1)
                if change is not None:
                    local.commit(state_maps, change, mine, taken)
                else:
                    for feature, new in zip(state_maps, new_maps):
                        feature[taken] = new[mine]
        if bool(success.any()):
            leaving = state["index"][success]
            best.x_adv[leaving] = candidate[success].reshape(len(leaving), *shape[1:])
            best.success[leaving] = True
            best.loss[leaving] = loss[success]
            state = _keep(state, ~success)
        return state

    def _forward(
        self,
        model: nn.Module,
        picked: Tensor,
        y: Tensor,
        wanted: Tensor | None,
        maps: list[Tensor],
        shape: torch.Size,
        local: WindowForward | None,
        window: tuple[Tensor, Tensor, tuple[int, int]] | None,
    ) -> tuple[Tensor, Change | None, list[Tensor]]:
        """Logits of the candidates ``picked``, with what :meth:`_query` keeps of their state:
        the change (window pass) or the whole state (full pass through ``local``); neither
        without ``local``."""
        if local is None:
            return model(picked.reshape(len(picked), *shape[1:])), None, []
        if window is None or not local.pays(window[2]):
            logits, new_maps = local.start(picked)
            return logits, None, new_maps
        logits, change = local(picked, maps, int(window[0]), int(window[1]), window[2])
        # A decision is never taken on the window pass's logits: the points they call
        # adversarial are judged by the model itself.
        flagged = is_adversarial(logits, y, wanted)
        if bool(flagged.any()):
            flagged = flagged.nonzero().squeeze(1)
            logits[flagged] = model(picked[flagged].reshape(len(flagged), *shape[1:]))
        return logits, change, []

    def _query_all(
        self,
        model: nn.Module,
        state: dict[str, Tensor],
        candidate: Tensor,
        changed: Tensor,
        best: Outcome,
        queries: Tensor,
        shape: torch.Size,
    ) -> None:
        """:meth:`_query` without reading anything back to the host: every row is passed to the
        model, but only the active rows that changed count as queries and can be accepted; the
        points that became adversarial are written into ``best`` and made inactive."""
        target = state.get("target")
        changed = changed & state["active"]
        logits = model(candidate.reshape(len(candidate), *shape[1:]))
        loss = self._objective(logits, state["y"], target).masked_fill(~changed, float("-inf"))
        success = is_adversarial(logits, state["y"], target) & changed
        index = state["index"]
        queries[index] += changed.to(queries.dtype)
        accept = (success | (loss > state["loss"])) & changed
        state["cur"] = torch.where(_per_sample(accept), candidate, state["cur"])
        state["loss"] = torch.where(accept, loss, state["loss"])
        rows = success.reshape((-1,) + (1,) * (len(shape) - 1))
        best.x_adv[index] = torch.where(
            rows, candidate.reshape(len(index), *shape[1:]), best.x_adv[index]
        )
        best.success[index] = best.success[index] | success
        best.loss[index] = torch.where(success, loss, best.loss[index])
        state["active"] = state["active"] & ~success

    # ------------------------------------------------------------------ linf
    def _start_linf(self, state: dict[str, Tensor], generator: torch.Generator | None) -> Tensor:
        """Vertical stripes: one random sign per channel and column, ``x ± eps`` in bounds."""
        n, c, _, w = state["x"].shape
        signs = random_signs((n, c, 1, w), generator, state["x"])
        return torch.where(signs > 0, state["plus"], state["minus"])

    def _propose_linf(
        self,
        state: dict[str, Tensor],
        iteration: int,
        generator: torch.Generator | None,
        dense: bool = False,
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, tuple[int, int]]]:
        """Set a random window to ``x ± eps`` (a random sign per point and channel). Where that
        would leave the point unchanged, flip a uniformly drawn non-empty subset of the channels'
        signs instead: the authors' redraw until something changes, in one step. Works on the
        windows only (gather/scatter); returns the candidates and which of them changed.
        ``dense``: draw the flips for every point and pick them where needed, with no read-back
        to the host. Also returns the window (top row, left column, size). The window sits at
        the same place in every point: each point's sequence of windows is still uniform and
        independent, as in the paper, and the window pass works on slices."""
        cur = state["cur"]
        n, c, h, w = cur.shape
        size = window_shape(p_selection(self.p_init, iteration, self.n_queries), h, w, "linf")
        top, left = random_corners(1, h, w, size, generator, cur.device)  # one for all points
        index = window_indices(top, left, (c, h, w), size).expand(n, -1)
        old = cur.reshape(n, -1).gather(1, index)
        plus = state["plus"].reshape(n, -1).gather(1, index).reshape(n, c, -1)
        minus = state["minus"].reshape(n, -1).gather(1, index).reshape(n, c, -1)
        signs = random_signs((n, c, 1), generator, cur)
        new = torch.where(signs > 0, plus, minus).reshape(n, -1)
        changed = (new != old).any(1)
        if dense:
            flips = _nonempty_subsets(n, c, generator, cur).reshape(n, c, 1)
            redrawn = torch.where(signs * (1 - 2 * flips) > 0, plus, minus).reshape(n, -1)
            new = torch.where(changed[:, None], new, redrawn)
            changed = (new != old).any(1)
        elif not bool(changed.all()):
            rows = (~changed).nonzero().squeeze(1)
            flips = _nonempty_subsets(len(rows), c, generator, cur).reshape(len(rows), c, 1)
            signs = signs[rows] * (1 - 2 * flips)
            new[rows] = torch.where(signs > 0, plus[rows], minus[rows]).reshape(len(rows), -1)
            changed = (new != old).any(1)
        candidate = cur.reshape(n, -1).scatter(1, index, new).reshape(cur.shape)
        return candidate, changed, (top, left, size)

    # ------------------------------------------------------------------ l2
    def _start_l2(self, state: dict[str, Tensor], context: tuple) -> Tensor:
        """A grid of bumps (tiles of a fifth of the side, centred), a random sign per sample,
        channel and tile, scaled to norm eps (Andriushchenko et al. 2020)."""
        lower, upper, mutable, generator = context
        x = state["x"]
        n, c, h, w = x.shape
        delta = torch.zeros_like(x)
        if h == 1:
            side = (1, max(w // 5, 1))
            tops, lefts = [0], _tile_starts(w, side[1])
        else:
            s = max(min(h, w) // 5, 1)
            side = (s, s)
            tops, lefts = _tile_starts(h, s), _tile_starts(w, s)
        shape = eta(*side).to(x.device, x.dtype)
        for top in tops:
            for left in lefts:
                flip = bool(h > 1 and torch.rand(1, generator=generator, device=x.device) > 0.5)
                tile = (shape.T if flip else shape)[: h - top, : w - left]
                signs = random_signs((n, c, 1, 1), generator, x)
                delta[:, :, top : top + side[0], left : left + side[1]] += tile * signs
        return self._finish_l2(x, delta, lower, upper, mutable)

    def _finish_l2(
        self, x: Tensor, delta: Tensor, lower: Tensor, upper: Tensor, mutable: Tensor
    ) -> Tensor:
        """Mask the perturbation, rescale it to norm eps, clamp the point into the bounds."""
        delta = delta * mutable
        norms = delta.flatten(1).norm(dim=1)
        scale = torch.where(norms > 0, self.threat.eps / norms.clamp_min(1e-12), 0.0)
        return torch.minimum(torch.maximum(x + delta * _per_sample(scale), lower), upper)

    def _propose_l2(
        self, state: dict[str, Tensor], iteration: int, context: tuple
    ) -> tuple[Tensor, Tensor]:
        """Replace window 1 by a bump plus its normalised content and empty window 2, giving
        window 1 the mass of both and the unused budget, then rescale to norm eps."""
        lower, upper, mutable, generator = context
        x, cur = state["x"], state["cur"]
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
        candidate = self._finish_l2(x, torch.where(both, 0.0, delta) + new, lower, upper, mutable)
        return candidate, (candidate != cur).flatten(1).any(1)


def _tile_starts(length: int, side: int) -> list[int]:
    """Corners of ``length // side`` tiles centred as a block of five (clipped to the plane)."""
    start = max((length - 5 * side) // 2, 0)
    return [start + k * side for k in range(length // side) if start + k * side < length]


def _nonempty_subsets(n: int, c: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """``(n, c)`` indicators of a uniformly drawn non-empty subset of ``c`` channels."""
    if c <= 62:
        code = torch.randint(1, 2**c, (n, 1), generator=generator, device=like.device)
        bits = (code >> torch.arange(c, device=like.device)) & 1
    else:  # independent coins, and one channel forced where none came up
        bits = torch.randint(0, 2, (n, c), generator=generator, device=like.device)
        forced = torch.randint(0, c, (n,), generator=generator, device=like.device)
        bits[torch.arange(n, device=like.device), forced] |= (bits.sum(1) == 0).long()
    return bits.to(like.dtype)
