"""HopSkipJump: a decision-based minimum-norm attack, for l2 and linf.

Chen, Jordan & Wainwright, "HopSkipJumpAttack: a query-efficient decision-based attack"
(IEEE S&P 2020). The attack sees only the model's decision, the predicted label: every query goes
through a label-only oracle that runs the model under ``torch.no_grad()`` and keeps nothing of its
output but the ``argmax``. From an adversarial starting point it repeats:

1. binary search between the clean point and the adversarial one, to land on the boundary
   (l2: along the segment; linf: shrinking the box ``x ± alpha``), to a tolerance
   ``theta = gamma / d^1.5`` (l2, in the blend factor) or ``min(theta, theta * dist)`` with
   ``theta = gamma / d^2`` (linf, in the box radius), ``d`` the number of features that may change;
2. estimate the direction of the gradient of the decision at the boundary point by Monte Carlo:
   ``B_t = min(init_evals * sqrt(t), max_evals)`` random unit directions (Gaussian for l2, uniform
   in the cube for linf), probed at radius ``delta`` (``0.1 * (upper - lower)`` at the first
   iteration, then ``gamma * dist / d`` with ``dist`` the distance of the last stepped point),
   weighted by +-1 decisions less their mean (the paper's baseline);
3. step along that direction (its sign for linf) by ``dist / sqrt(t)``, halved until the step
   lands on the adversarial side (geometric progression), then go back to 1.

Defaults are the authors' code (``hsja.py``): 40 iterations, ``init_evals=100``,
``max_evals=10_000``, ``gamma=1.0``, geometric step search (the grid search variant is not
offered). The start is uniform noise in the box, on the mutable features only, drawn until the
model's decision is adversarial (at most ``init_trials=100`` draws per point, ART's default; the
authors draw until found), then blended towards the clean point by a binary search to 0.001, as in
the authors' code. A targeted attack may also be given ``starting_points=`` already predicted as the
target (points that are not are replaced by the noise search).

Budget: ``n_queries`` per point and run, the check of the clean point included (default 25,000,
enough for the 40 default iterations: 17,145 gradient queries plus the searches, at any input
size). Each phase queries only the points that still have budget; a point's gradient estimate
is cut to its remaining budget less one query (for the step), and a point whose budget ends
mid-search keeps its last adversarial point. Called as a bounded attack (``attack(model, x, y)``
with a finite eps), a point stops as soon as it has an adversarial point within eps; ``min_norm``
runs every iteration. The count of the last call is :attr:`HopSkipJump.queries_used`.

Every point of a batch runs in lockstep and each phase queries all points in one batch of model
calls (``query_batch_size`` inputs per forward pass). Unlike the authors' code, which returns the
last iterate, each point returns the smallest adversarial point it met on the boundary; the
step-size search stops after 64 halvings (the point then stays). Immutable features (the threat
model's mask) are never perturbed and per-feature bounds are enforced by clipping.

Example:
    >>> attack = HopSkipJump(norm="l2", seed=0)
    >>> result = attack.min_norm(model, x, y)             # result.norm: the l2 margins found
    >>> x_adv = HopSkipJump(norm="linf", eps=0.1, steps=20)(model, x, y)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..threat import Norm, ThreatModel, lp_norm
from ..util import check_positive_int
from .base import MinNormAttack, MinNormResult, Outcome
from .fast_grad import suspended
from .registry import register

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .base import AttackOptions

#: Halvings of the step in the geometric step-size search before the point gives up its step.
MAX_HALVINGS = 64
#: Tolerance of the binary search that blends the starting noise towards the clean point.
BLEND_TOLERANCE = 0.001


class LabelOracle:
    """The model seen through its decisions only, with the queries counted per point.

    ``oracle(points, rows)`` runs the model on ``points`` (``query_batch_size`` at a time,
    without gradients), keeps only the predicted labels, and answers whether each point is
    adversarial for the sample of the batch it belongs to (``rows``).
    """

    def __init__(
        self,
        model: nn.Module,
        y: Tensor,
        target: Tensor | None,
        n_queries: int,
        query_batch_size: int,
    ) -> None:
        self._model, self._y, self._target = model, y, target
        self.n_queries, self.query_batch_size = n_queries, query_batch_size
        self.queries = torch.zeros(len(y), dtype=torch.int64, device=y.device)

    def labels(self, points: Tensor) -> Tensor:
        """The predicted labels of ``points``: the only thing the model ever gives away."""
        with torch.no_grad(), suspended():
            return torch.cat(
                [
                    self._model(chunk).argmax(1)
                    for chunk in points.detach().split(self.query_batch_size)
                ]
            )

    def __call__(self, points: Tensor, rows: Tensor) -> Tensor:
        if len(rows) == 0:
            return torch.zeros(0, dtype=torch.bool, device=points.device)
        labels = self.labels(points)
        self.queries.index_add_(0, rows, torch.ones_like(rows))
        if self._target is None:
            return labels != self._y[rows]
        return labels == self._target[rows]

    def left(self, rows: Tensor) -> Tensor:
        """Queries each sample of ``rows`` may still make."""
        return self.n_queries - self.queries[rows]


@dataclass
class _Batch:
    """Bookkeeping of one batch of the base's batching: queries spent, starting points, and the
    rows that the current run of ``__call__``'s restarts attacks."""

    queries: Tensor  # int64, CPU, per sample of the batch, summed over runs
    broken: Tensor  # bool, CPU: samples some earlier run already broke (``__call__`` restarts)
    starts: Tensor | None  # the user's starting points for the batch, on the model's device
    rows: Tensor | None = None  # rows of the batch given to ``minimize`` (None: all)
    stop_at: float | None = None  # a bounded run: a point found within this norm is done


@register("hsj")
class HopSkipJump(MinNormAttack):
    """HopSkipJump (Chen, Jordan & Wainwright 2020): decision-based, minimum l2 or linf norm.

    Args:
        threat: the threat model (l2 or linf; ``eps`` may be omitted for an unbounded search),
            or ``norm`` (default ``"l2"``, the authors' default)/``eps``/bounds/mask as keywords.
        steps: iterations (gradient estimate, step, binary search) per run (default 40).
        n_queries: model queries per point and run, all phases included (default 25,000).
        init_evals: random directions of the first gradient estimate (default 100); iteration
            ``t`` uses ``init_evals * sqrt(t)``.
        max_evals: the most random directions of one gradient estimate (default 10,000).
        gamma: sets the binary search tolerance and the probing radius (default 1.0).
        init_trials: random noise draws per point to find an adversarial start (default 100).
        query_batch_size: inputs per forward pass of the model (default 1024).
        restarts, batch_size, seed: see :class:`~advtrain.attacks.base.Attack`.

    Attributes:
        queries_used: after a call, the queries spent on each of its points (int64, CPU), summed
            over restarts; the base's own check of the result is not a query of the attack.
    """

    norms = ("l2", "linf")
    default_norm: ClassVar[Norm] = "l2"

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        steps: int = 40,
        n_queries: int = 25_000,
        init_evals: int = 100,
        max_evals: int = 10_000,
        gamma: float = 1.0,
        init_trials: int = 100,
        query_batch_size: int = 1024,
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(threat, **options)
        for name, value in (
            ("steps", steps),
            ("n_queries", n_queries),
            ("init_evals", init_evals),
            ("max_evals", max_evals),
            ("init_trials", init_trials),
            ("query_batch_size", query_batch_size),
        ):
            check_positive_int(name, value)
        if init_evals > max_evals:
            raise AdvtrainError(f"init_evals ({init_evals}) must be <= max_evals ({max_evals})")
        if (
            isinstance(gamma, bool)
            or not isinstance(gamma, (int, float))
            or not (0 < gamma < float("inf"))
        ):
            raise AdvtrainError(f"gamma must be a positive finite number, got {gamma!r}")
        self.steps, self.n_queries = steps, n_queries
        self.init_evals, self.max_evals, self.gamma = init_evals, max_evals, float(gamma)
        self.init_trials, self.query_batch_size = init_trials, query_batch_size
        self.queries_used: Tensor = torch.zeros(0, dtype=torch.int64)
        self._starts: Tensor | None = None
        self._cursor = 0
        self._spent: list[Tensor] = []
        self._batch: _Batch | None = None

    def _hyperparameters(self) -> dict[str, object]:
        return {
            **super()._hyperparameters(),
            "steps": self.steps,
            "n_queries": self.n_queries,
            "init_evals": self.init_evals,
            "max_evals": self.max_evals,
            "gamma": self.gamma,
        }

    # ------------------------------------------------------------------ entry points
    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        target: Tensor | None = None,
        starting_points: Tensor | None = None,
    ) -> Tensor:
        """Adversarial examples inside the threat model; ``starting_points`` (shaped like ``x``)
        are adversarial points to start from instead of the noise search."""
        with self._session(x, starting_points):
            return super().__call__(model, x, y, target=target)

    def min_norm(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        target: Tensor | None = None,
        starting_points: Tensor | None = None,
    ) -> MinNormResult:
        """The smallest adversarial perturbation found for each point, and its norm."""
        with self._session(x, starting_points):
            return super().min_norm(model, x, y, target=target)

    @property
    def screens_clean_points(self) -> bool:
        return False  # the clean point is the search's first query, counted in its budget

    @contextlib.contextmanager
    def _session(self, x: Tensor, starting_points: Tensor | None) -> Iterator[None]:
        if starting_points is not None:
            if (
                not isinstance(starting_points, Tensor)
                or not isinstance(x, Tensor)
                or (starting_points.shape != x.shape)
            ):
                got = getattr(starting_points, "shape", None)
                got = tuple(got) if got is not None else type(starting_points).__name__
                raise AdvtrainError(
                    f"starting_points must be a tensor shaped like x "
                    f"{tuple(getattr(x, 'shape', ()))}, got {got}"
                )
            if not starting_points.is_floating_point() or not bool(
                torch.isfinite(starting_points).all()
            ):
                raise AdvtrainError("starting_points must hold finite floating-point values")
        self._starts, self._cursor, self._spent = (
            None if starting_points is None else starting_points.detach(),
            0,
            [],
        )
        try:
            yield
        finally:
            self.queries_used = (
                torch.cat(self._spent) if self._spent else torch.zeros(0, dtype=torch.int64)
            )
            self._starts, self._spent, self._batch = None, [], None

    @contextlib.contextmanager
    def _batch_of(self, x: Tensor) -> Iterator[None]:
        """Bookkeeping for one batch of the base's batching (they come in order)."""
        starts = None
        if self._starts is not None:
            starts = self._starts[self._cursor : self._cursor + len(x)].to(x.device, x.dtype)
        self._cursor += len(x)
        self._batch = _Batch(
            torch.zeros(len(x), dtype=torch.int64), torch.zeros(len(x), dtype=torch.bool), starts
        )
        try:
            yield
        finally:
            self._spent.append(self._batch.queries)
            self._batch = None

    def _restarts(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        with self._batch_of(x):
            return super()._restarts(model, x, y, target, generator)

    def _minimize_restarts(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        with self._batch_of(x):
            return super()._minimize_restarts(model, x, y, target, generator)

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        """The base's run; each restart of ``__call__`` attacks the rows no earlier run broke."""
        batch = self._batch
        if batch is None:
            return super().run(model, x, y, target, generator)
        batch.rows = (~batch.broken).nonzero().squeeze(1)
        batch.stop_at = self.threat.eps if self.threat.bounded else None
        try:
            outcome = super().run(model, x, y, target, generator)
        finally:
            rows, batch.rows, batch.stop_at = batch.rows, None, None
        batch.broken[rows] |= outcome.success.cpu()
        return outcome

    # ------------------------------------------------------------------ the attack
    def minimize(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        oracle = LabelOracle(model, y, target, self.n_queries, self.query_batch_size)
        batch = self._batch
        starts = None
        if batch is not None and batch.starts is not None:
            starts = batch.starts if batch.rows is None else batch.starts[batch.rows.to(x.device)]
        try:
            return self._search(
                oracle, x, starts, generator, stop_at=None if batch is None else batch.stop_at
            )
        finally:
            spent = oracle.queries.cpu()
            if batch is None:
                self.queries_used = spent
            elif batch.rows is None:
                batch.queries += spent
            else:
                batch.queries[batch.rows] += spent

    def _search(
        self,
        oracle: LabelOracle,
        x: Tensor,
        starts: Tensor | None,
        generator: torch.Generator | None,
        stop_at: float | None = None,
    ) -> Tensor:
        """The smallest adversarial point found per row; with ``stop_at`` (a bounded run), a
        row stops querying once it has one within that norm."""
        threat, n = self.threat, len(x)
        x_best = x.clone()
        everyone = torch.arange(n, device=x.device)
        already = oracle(x, everyone)  # a point already adversarial is its own answer
        d = self._dimension(x)
        if d == 0:
            return x_best
        rows = everyone[~already]
        rows, adv = self._initialize(oracle, x, rows, starts, generator)
        if len(rows) == 0:
            return x_best
        theta = self.gamma / (d**1.5 if threat.norm == "l2" else d**2)
        cur, dist_post = self._boundary(oracle, x[rows], adv, rows, theta)
        x_best[rows] = cur
        best_norm = torch.full((n,), float("inf"), dtype=torch.float64, device=x.device)
        best_norm[rows] = lp_norm(cur - x[rows], threat.norm).double()
        span = self._span(x)
        for t in range(1, self.steps + 1):
            keep = oracle.left(rows) >= 2  # one gradient query and one step query at least
            if stop_at is not None:
                keep &= best_norm[rows] > stop_at
            rows, cur, dist_post = rows[keep], cur[keep], dist_post[keep]
            if len(rows) == 0:
                break
            x_rows = x[rows]
            dist = lp_norm(cur - x_rows, threat.norm).double()
            delta = (
                (torch.full_like(dist, 0.1 * span) if t == 1 else self.gamma * dist_post / d)
                .clamp_min(1e-12)
                .to(x.dtype)
            )
            evals = min(int(self.init_evals * math.sqrt(t)), self.max_evals)
            counts = (oracle.left(rows) - 1).clamp(max=evals)
            grad = self._gradient(oracle, cur, rows, delta, counts, generator)
            update = grad.sign() if threat.norm == "linf" else grad
            stepped, moved = self._step(oracle, cur, rows, update, dist / math.sqrt(t))
            if bool(moved.any()):
                landed, post = self._boundary(
                    oracle, x_rows[moved], stepped[moved], rows[moved], theta
                )
                cur[moved], dist_post[moved] = landed, post
            norms = lp_norm(cur - x_rows, threat.norm).double()
            better = norms < best_norm[rows]
            x_best[rows[better]] = cur[better]
            best_norm[rows[better]] = norms[better]
        return x_best

    # ------------------------------------------------------------------ the pieces
    def _dimension(self, x: Tensor) -> int:
        """The number of features that may change (the ``d`` of the paper)."""
        if self.threat.mask is None:
            return math.prod(x.shape[1:])
        return int(self.threat.mask.to(x.device).expand(x.shape[1:]).sum())

    def _span(self, x: Tensor) -> float:
        """The width of the box, ``upper - lower``, averaged over the mutable features."""
        lower, upper = (
            torch.as_tensor(b, dtype=x.dtype, device=x.device).expand(x.shape[1:])
            for b in (self.threat.lower, self.threat.upper)
        )
        width = upper - lower
        if self.threat.mask is not None:
            width = width[self.threat.mask.to(x.device).expand(x.shape[1:])]
        return float(width.mean())

    def _initialize(
        self,
        oracle: LabelOracle,
        x: Tensor,
        rows: Tensor,
        starts: Tensor | None,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        """Adversarial starting points for ``rows`` (the rows found, and their points): the
        user's starting points where adversarial, else uniform noise in the box drawn until
        adversarial, then blended towards the clean point by binary search."""
        threat = self.threat
        found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        points = x.clone()
        if starts is not None and len(rows):
            fixed = threat.clip_bounds(x[rows] + threat.apply_mask(starts[rows] - x[rows]))
            usable = rows[oracle.left(rows) >= 1]
            fixed = fixed[oracle.left(rows) >= 1]
            good = oracle(fixed, usable)
            points[usable[good]], found[usable[good]] = fixed[good], True
        pending = rows[~found[rows]]
        box = threat.replace(eps=float("inf"))
        noisy = torch.zeros_like(found)
        for _ in range(self.init_trials):
            pending = pending[oracle.left(pending) >= 1]
            if len(pending) == 0:
                break
            noise = box.random_start(x[pending], generator)
            good = oracle(noise, pending)
            points[pending[good]] = noise[good]
            found[pending[good]] = noisy[pending[good]] = True
            pending = pending[~good]
        blend = rows[noisy[rows]]
        if len(blend):
            points[blend] = self._blend(oracle, x[blend], points[blend], blend)
        rows = rows[found[rows]]
        return rows, points[rows]

    def _blend(self, oracle: LabelOracle, x: Tensor, noise: Tensor, rows: Tensor) -> Tensor:
        """Binary search on ``(1 - a) x + a noise`` for the smallest adversarial ``a``."""
        low = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        high = torch.ones_like(low)
        best = noise.clone()
        while True:
            live = ((high - low) > BLEND_TOLERANCE) & (oracle.left(rows) >= 1)
            if not bool(live.any()):
                return best
            mid = (low + high)[live] / 2
            a = _rows_like(mid.to(x.dtype), x[live])
            blended = (1 - a) * x[live] + a * noise[live]
            good = oracle(blended, rows[live])
            index = live.nonzero().squeeze(1)
            high[index[good]], low[index[~good]] = mid[good], mid[~good]
            best[index[good]] = blended[good]

    def _project(self, x: Tensor, adv: Tensor, alpha: Tensor) -> Tensor:
        """The point at ``alpha`` between ``x`` and ``adv``: the blend factor (l2) or the radius
        of the box around ``x`` (linf)."""
        a = _rows_like(alpha.to(x.dtype), x)
        if self.threat.norm == "l2":
            return (1 - a) * x + a * adv
        return torch.minimum(torch.maximum(adv, x - a), x + a)

    def _boundary(
        self, oracle: LabelOracle, x: Tensor, adv: Tensor, rows: Tensor, theta: float
    ) -> tuple[Tensor, Tensor]:
        """Binary search between ``x`` and the adversarial ``adv`` to the boundary: the
        adversarial points found, and the distances of ``adv`` (the authors'
        ``dist_post_update``)."""
        dist_post = lp_norm(adv - x, self.threat.norm).double()
        if self.threat.norm == "l2":
            high = torch.ones_like(dist_post)
            tolerance = torch.full_like(dist_post, theta)
        else:
            high = dist_post.clone()
            tolerance = (dist_post * theta).clamp(max=theta)
        low = torch.zeros_like(high)
        best = adv.clone()
        while True:
            mid = (low + high) / 2
            live = ((high - low) > tolerance) & (mid > low) & (mid < high)  # float precision
            live &= oracle.left(rows) >= 1
            if not bool(live.any()):
                return best, dist_post
            index = live.nonzero().squeeze(1)
            mid = mid[index]
            points = self._project(x[index], adv[index], mid)
            good = oracle(points, rows[index])
            high[index[good]], low[index[~good]] = mid[good], mid[~good]
            best[index[good]] = points[good]

    def _gradient(
        self,
        oracle: LabelOracle,
        cur: Tensor,
        rows: Tensor,
        delta: Tensor,
        counts: Tensor,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Monte-Carlo estimate of the unit direction of the gradient of the decision at the
        boundary points ``cur``, with ``counts`` random directions per point, probed at radius
        ``delta``; the decisions (+-1) are centred by their mean unless all agree."""
        threat, m = self.threat, len(cur)
        shape = cur.shape[1:]
        total = int(counts.max())
        chunk = max(1, self.query_batch_size // m)
        weighted = torch.zeros_like(cur)
        plain = torch.zeros_like(cur)
        signs = torch.zeros(m, dtype=cur.dtype, device=cur.device)
        radius = delta.reshape(m, 1, *(1,) * len(shape))
        for start in range(0, total, chunk):
            b = min(chunk, total - start)
            valid = torch.arange(start, start + b, device=cur.device)[None] < counts[:, None].to(
                cur.device
            )
            draw = torch.randn if threat.norm == "l2" else torch.rand
            rv = draw((m, b, *shape), generator=generator, device=cur.device, dtype=cur.dtype)
            if threat.norm != "l2":
                rv = rv * 2 - 1
            rv = threat.apply_mask(rv)
            rv = rv / rv.flatten(2).norm(dim=2).clamp_min(1e-12).reshape(m, b, *(1,) * len(shape))
            probes = threat.clip_bounds(cur[:, None] + radius * rv)
            rv = (probes - cur[:, None]) / radius
            decisions = oracle(probes[valid], rows[:, None].expand(m, b)[valid])
            f = torch.zeros((m, b), dtype=cur.dtype, device=cur.device)
            f[valid] = decisions.to(cur.dtype) * 2 - 1
            spread = (m, b, *(1,) * len(shape))
            weighted += (f.reshape(spread) * rv).sum(1)
            plain += (valid.to(cur.dtype).reshape(spread) * rv).sum(1)
            signs += f.sum(1)
        mean = signs / counts.to(cur.device, cur.dtype).clamp_min(1)
        centred = weighted - _rows_like(mean, cur) * plain
        grad = torch.where(_rows_like(mean.abs() == 1, cur), weighted, centred)
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        return grad / _rows_like(norms, grad)

    def _step(
        self, oracle: LabelOracle, cur: Tensor, rows: Tensor, update: Tensor, size: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Geometric step-size search: from ``size``, halve the step along ``update`` until it
        lands on the adversarial side. The stepped points, and which points moved."""
        size = size.clone()
        stepped = cur.clone()
        moved = torch.zeros(len(cur), dtype=torch.bool, device=cur.device)
        pending = torch.ones_like(moved)
        for _ in range(MAX_HALVINGS):
            live = pending & (oracle.left(rows) >= 1)
            if not bool(live.any()):
                break
            index = live.nonzero().squeeze(1)
            step = _rows_like(size[index].to(cur.dtype), cur[index])
            candidates = self.threat.clip_bounds(cur[index] + step * update[index])
            good = oracle(candidates, rows[index])
            stepped[index[good]] = candidates[good]
            moved[index[good]], pending[index[good]] = True, False
            size[index[~good]] /= 2
        return stepped, moved


def _rows_like(values: Tensor, like: Tensor) -> Tensor:
    """A per-sample vector shaped to broadcast against a batch shaped like ``like``."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))
