"""FAB, the fast adaptive boundary attack: a minimum-norm attack for the linf, l2 and l1 norms.

Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary attack"
(ICML 2020). Like DeepFool, each step linearises the classifier at the current point ``x_i`` and
picks the nearest linearised boundary ``pi`` (the other class ``k`` minimising
``|f_k - f_y| / ||grad(f_k - f_y)||_q``). Unlike DeepFool it projects onto ``pi`` *within the box*
of valid inputs (the exact minimum-norm point of the hyperplane intersected with the box), and
it projects both the current point and the original point ``x``:

    x_{i+1} = clip((1 - alpha) (x_i + eta d_i) + alpha (x + eta d_x)),
    alpha = min(||d_i|| / (||d_i|| + ||d_x||), alpha_max),

which biases the iterates towards ``x``. Once a point is adversarial it is remembered if its norm
is the smallest so far, and it steps back towards ``x``: ``x_i <- x + beta (x_i - x)``. Every
point takes every step; the result is the smallest adversarial point found.

Defaults are the paper's and AutoAttack's: 100 steps, ``alpha_max = 0.1``, ``eta = 1.05``,
``beta = 0.9``. The first run starts at ``x``; each further restart (``restarts``, via the base
class) starts at a random point of the sphere around ``x`` of radius half the smallest norm found
so far, capped by ``eps`` (or by the size of the box when unbounded), as in the authors' code.

:class:`FABT` (``"fab-t"``) is AutoAttack's targeted variant: for each point it runs FAB towards
the boundary between its true class and its 2nd, 3rd, ... most likely class (``n_targets`` of
them; AutoAttack uses 9), with one linearisation per step instead of one per class; any
misclassification counts and the smallest norm over the targets is kept. With ``target=``, both
run targeted FAB towards the given classes (the boundary between the target and the strongest
other class) and succeed only there.

Immutable features (``mask``) have zero gradient and the projection never moves them; the box of
the projection is the threat model's per-feature ``lower``/``upper``.

``nearest="linear"`` (the default) picks the boundary by the paper's rule, which ignores the box.
In tight boxes (tabular data) the boundary nearest without the box may be far, or out of reach,
within it; ``nearest="box"`` picks the boundary whose projection *within the box* is shortest
(those the box cannot reach are skipped), at the cost of one projection per class per step. On
an affine classifier in a box it finds the exact margin (within the overshoot), where the paper's
rule can land further away.

Example:
    >>> result = FAB(norm="linf", steps=100).min_norm(model, x, y)  # per-point linf margin
    >>> x_adv = FABT(norm="l2", eps=1.0)(model, x, y)                 # kept within eps = 1.0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from ..device_sync import compaction_interval
from ..errors import AdvtrainError
from ..losses import is_adversarial, other_classes
from ..threat import ThreatModel, lp_norm
from ..util import check_positive_int
from .base import MinNormAttack, Outcome, put_rows, rerun_unbroken, rows_of
from .deepfool import boundary_gradients, dual_norm
from .fast_grad import suspended
from .registry import register
from .targeting import check_target_order, ranked_targets

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .base import AttackOptions

#: The paper's and AutoAttack's defaults (Croce & Hein 2020).
STEPS, ALPHA_MAX, ETA, BETA = 100, 0.1, 1.05, 0.9

# ---------------------------------------------------------------------- the projection
#: Newton steps of :func:`_water_level` before the rows still short fall back to sorting.
NEWTON_STEPS = 20


def _water_level(weight: Tensor, knee: Tensor, need: Tensor) -> Tensor:
    """Per row, the smallest ``lam >= 0`` with ``g(lam) = sum_i weight_i min(lam, knee_i) >= need``.

    ``weight``, ``knee`` (n, D) are >= 0; ``inf`` where even ``lam = inf`` falls short. ``g`` is
    piecewise linear, concave and increasing, so Newton's method from ``lam = 0`` climbs to the
    root without overshooting: each step lands on a later linear piece, or on the root itself.
    Each step works on fewer rows, and there are few steps, where sorting the knees
    (:func:`_water_level_sorted`, used for any row still short after :data:`NEWTON_STEPS`)
    costs a sort of every row. Newton drops the rows it has solved, which
    reads their count back to the host: on an accelerator
    (:func:`~advtrain.device_sync.compaction_interval`) the sort runs instead, with no read-back.
    """
    if compaction_interval(weight.device) > 1:
        return _water_level_sorted(weight, knee, need)
    total = (weight * knee).sum(dim=1)
    reachable = total >= need
    level = torch.where(reachable, 0.0, float("inf")).to(need.dtype)
    rows = (reachable & (need > 0)).nonzero().squeeze(1)
    weight, knee, need = weight[rows], knee[rows], need[rows]
    lam = torch.zeros_like(need)
    tolerance = 32 * torch.finfo(need.dtype).eps * need
    for _ in range(NEWTON_STEPS):
        if len(rows) == 0:
            return level
        at = lam[:, None]
        gap = need - (weight * torch.minimum(knee, at)).sum(dim=1)
        slope = (weight * (knee > at)).sum(dim=1)
        going = (gap > tolerance) & (slope > 0)
        lam = torch.where(going, lam + gap / slope.clamp_min(1e-30), lam)
        level[rows] = lam
        if not bool(going.all()):
            keep = going.nonzero().squeeze(1)
            rows, weight, knee, need, lam, tolerance = (
                t[keep] for t in (rows, weight, knee, need, lam, tolerance)
            )
    if len(rows):
        level[rows] = _water_level_sorted(weight, knee, need)
    return level


def _water_level_sorted(weight: Tensor, knee: Tensor, need: Tensor) -> Tensor:
    """:func:`_water_level` by sorting the knees (the kinks of the sum) and solving on the
    piece where the sum reaches ``need``."""
    knees, order = knee.sort(dim=1)
    weights = weight.gather(1, order)
    before = (weights * knees).cumsum(dim=1) - weights * knees  # full pieces left of each knee
    after = weights.flip(1).cumsum(dim=1).flip(1)  # weight still growing from each knee on
    at_knee = before + after * knees  # the sum at lam = knee_i
    piece = (at_knee < need[:, None]).sum(dim=1, keepdim=True)  # first knee that reaches `need`
    last = knees.shape[1] - 1
    feasible = piece.squeeze(1) <= last
    piece = piece.clamp(max=last)
    level = (need[:, None] - before.gather(1, piece)) / after.gather(1, piece).clamp_min(1e-30)
    previous = knees.gather(1, (piece - 1).clamp(min=0)) * (piece > 0)
    level = torch.minimum(torch.maximum(level, previous), knees.gather(1, piece)).squeeze(1)
    return torch.where(feasible, level.clamp_min(0), torch.full_like(level, float("inf")))


def project_onto_hyperplane_in_box(
    point: Tensor, w: Tensor, residual: Tensor, lower: Tensor, upper: Tensor, norm: str
) -> Tensor:
    """The step ``d`` of smallest ``norm`` with ``w . d = -residual`` and
    ``lower <= point + d <= upper``: the projection of ``point`` onto the hyperplane
    ``{z : w . (z - point) + residual = 0}`` intersected with the box (Croce & Hein 2020, sec. 3.1).

    All tensors are flat: ``point``, ``w``, ``lower``, ``upper`` (n, D), ``residual`` (n,). Where
    the box does not reach the hyperplane, the step goes to the box corner that comes closest.
    Features where ``w`` is zero never move.
    """
    return _project(point, w, residual, lower, upper, norm)[0]


def _project(
    point: Tensor, w: Tensor, residual: Tensor, lower: Tensor, upper: Tensor, norm: str
) -> tuple[Tensor, Tensor]:
    """:func:`project_onto_hyperplane_in_box`, and per row whether the box reaches the hyperplane.

    Orient ``w`` so that the residual is positive. Moving feature ``i`` against ``sign(w_i)``
    lowers ``w . z`` by ``|w_i|`` per unit, by at most its room to the box, ``room_i``. The
    optimum moves each feature by ``min(lam, room_i)`` (linf), ``|w_i| min(lam, room_i / |w_i|)``
    (l2: KKT), or fills the features with the largest ``|w_i|`` first (l1), with the smallest
    ``lam`` that cancels the residual.
    """
    flip = torch.where(residual < 0, -1.0, 1.0).to(w.dtype)[:, None]
    w, need = w * flip, residual.abs()
    room = torch.where(w > 0, point - lower, upper - point).clamp_min(0)
    size = w.abs()
    if norm == "l1":
        return _l1_step(w, size, room, need)
    if norm == "linf":
        level = _water_level(size, room, need)
        return -w.sign() * torch.minimum(room, level[:, None]), torch.isfinite(level)
    moving = size > 0
    knee = torch.where(moving, room / torch.where(moving, size, 1.0), 0.0)
    level = _water_level(size * size, knee, need)
    return -w * torch.minimum(knee, level[:, None]), torch.isfinite(level)


def _l1_step(w: Tensor, size: Tensor, room: Tensor, need: Tensor) -> tuple[Tensor, Tensor]:
    """The l1 case: a fractional knapsack, features in decreasing ``|w_i|`` filled to their room."""
    order = size.argsort(dim=1, descending=True)
    sizes, rooms = size.gather(1, order), room.gather(1, order)
    reach = (sizes * rooms).cumsum(dim=1)  # the residual cancelled by filling features 0..j
    before = reach - sizes * rooms
    partial = ((need[:, None] - before) / sizes.clamp_min(1e-30)).clamp(min=0)
    moved = torch.minimum(rooms, partial) * (before < need[:, None])  # full, then partial, then 0
    moved = moved * (sizes > 0)
    step = -w.sign() * torch.zeros_like(moved).scatter(1, order, moved)
    return step, reach[:, -1] >= need


# ---------------------------------------------------------------------- the attack
@register("fab")
class FAB(MinNormAttack):
    """The fast adaptive boundary attack (Croce & Hein 2020), untargeted, linf, l2 or l1.

    Args:
        threat: the threat model, or ``norm``/bounds/mask as keywords; ``eps`` may be omitted
            (unbounded: :meth:`min_norm` gives each point's margin).
        steps: iterations per run (default 100).
        alpha_max: the largest weight of the step from the original point (default 0.1).
        eta: overshoot of the projections (default 1.05).
        beta: the backward step towards the original point after a success (default 0.9).
        nearest: how the boundary to project onto is picked: ``"linear"`` (the paper's rule, the
            default) or ``"box"`` (the nearest within the box; see the module docstring).
        restarts, batch_size, seed: see :class:`~advtrain.attacks.base.Attack`; restarts after
            the first start from random points (see the module docstring).
    """

    norms: ClassVar[tuple[str, ...]] = ("linf", "l2", "l1")

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        steps: int = STEPS,
        alpha_max: float = ALPHA_MAX,
        eta: float = ETA,
        beta: float = BETA,
        nearest: str = "linear",
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(threat, **options)
        check_positive_int("steps", steps)
        for name, value in (("alpha_max", alpha_max), ("beta", beta)):
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise AdvtrainError(f"{name} must be between 0 and 1, got {value!r}")
        if not (isinstance(eta, (int, float)) and 1 <= eta < float("inf")):
            raise AdvtrainError(f"eta must be finite and >= 1, got {eta!r}")
        if nearest not in ("linear", "box"):
            raise AdvtrainError(f"nearest must be 'linear' or 'box', got {nearest!r}")
        self.nearest = nearest
        self.steps, self.alpha_max = steps, float(alpha_max)
        self.eta, self.beta = float(eta), float(beta)

    def _hyperparameters(self) -> dict[str, object]:
        return {
            **super()._hyperparameters(),
            "steps": self.steps,
            "alpha_max": self.alpha_max,
            "eta": self.eta,
            "beta": self.beta,
            "nearest": self.nearest,
        }

    # ------------------------------------------------------------------ runs and restarts
    def minimize(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        return self._minimize_from(model, x, y, target, generator, None)

    def _minimize_from(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
        radius: Tensor | None,
    ) -> Tensor:
        """:meth:`minimize` from random starts of per-point ``radius`` (None: from ``x``)."""
        return self.descend(model, x, y, target, target, generator, radius)[0]

    def _restart_minimize(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
        best: Outcome | None,
    ) -> Tensor:
        """Each run of :meth:`min_norm`'s restarts after the first starts at random, at a
        radius that follows the smallest norm found so far."""
        radius = None if best is None else self._start_radius(x, -best.loss)
        return self._minimize_from(model, x, y, target, generator, radius)

    def _restarts(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        """The base's restarts for a finite eps: later runs only on the points still standing,
        from random starts."""

        def once(_: int, index: Tensor, best: Outcome | None) -> Outcome:
            xi, yi, ti = rows_of(index, x, y, target)
            radius = None if best is None else self._start_radius(xi, -best.loss[index])
            return self._within_eps(
                model, xi, yi, ti, self._minimize_from(model, xi, yi, ti, generator, radius)
            )

        return rerun_unbroken(len(x), x.device, self.restarts, once)

    def _start_radius(self, x: Tensor, found: Tensor) -> Tensor:
        """Half the smallest norm found (``inf`` where none), capped by eps or else by the box."""
        threat = self.threat
        if threat.bounded:
            cap = torch.full_like(found, threat.eps)
        else:
            lower, upper = _box(threat, x)
            cap = lp_norm(threat.apply_mask(upper - lower), threat.norm)
        return torch.minimum(found, cap) / 2

    def _random_start(self, x: Tensor, radius: Tensor, generator: torch.Generator | None) -> Tensor:
        """A random point on the sphere of ``radius`` around each point, masked, clipped."""
        if self.threat.norm == "linf":
            direction = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            direction = direction * 2 - 1
        else:
            direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = self.threat.apply_mask(direction)
        scale = radius / lp_norm(direction, self.threat.norm).clamp_min(1e-12)
        return self.threat.clip_bounds(x + direction * scale.reshape((-1,) + (1,) * (x.dim() - 1)))

    # ------------------------------------------------------------------ one run
    def descend(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        towards: Tensor | None,
        success_target: Tensor | None,
        generator: torch.Generator | None,
        radius: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One FAB run: per point the smallest adversarial point found and its norm (the clean
        point and ``inf`` where none).

        ``towards``: ``None`` for the untargeted attack (every other class), else one class per
        point whose boundary the run follows; a point succeeds when it is classified as
        ``success_target``, or misclassified when that is None. ``radius``: per point, the
        random-start radius (``None``: start at ``x``).
        """
        threat, norm = self.threat, self.threat.norm
        best_x = x.clone()
        with torch.no_grad():
            logits = model(x) if len(x) else None
        if logits is None:
            return best_x, torch.zeros(0, device=x.device, dtype=x.dtype)
        done = is_adversarial(logits, y, success_target)
        best_norm = torch.where(done, 0.0, float("inf")).to(x.dtype)
        index = (~done).nonzero().squeeze(1)
        if len(index) == 0 or logits.shape[1] < 2:
            return best_x, best_norm
        x0, y0 = x[index], y[index]
        wanted = None if success_target is None else success_target[index]
        # Towards a class, any misclassification counting (FAB-T): the boundary between it and
        # the true class, as in AutoAttack. To be classified as it: the boundary between it and
        # the strongest other class, whichever that is at the current point.
        away: Tensor | None
        if towards is None:  # every other class, against the true one
            columns, away = other_classes(logits[index], y0, logits.shape[1] - 1), y0
        else:
            columns, away = towards[index][:, None], (y0 if wanted is None else None)
        x1 = x0.clone() if radius is None else self._random_start(x0, radius[index], generator)
        lower, upper = (b.flatten(1) for b in _box(threat, x0))
        n, shape = len(x0), (-1,) + (1,) * (x0.dim() - 1)
        flat0 = x0.flatten(1)
        for _ in range(self.steps):
            _, diff, grads = boundary_gradients(model, x1, columns, away)
            grads = threat.apply_mask(grads)
            if self.nearest == "box" and diff.shape[1] > 1:
                nearest = _nearest_in_box(x1.flatten(1), diff, grads.flatten(2), lower, upper, norm)
            else:
                nearest = (diff.abs() / (dual_norm(grads, norm) + 1e-12)).argmin(dim=1)
            rows = torch.arange(n, device=x.device)
            f, w = diff[rows, nearest], grads[rows, nearest].flatten(1)
            flat1 = x1.flatten(1)
            with torch.no_grad(), suspended():  # no gradient here: skip the mode's dispatch
                # The hyperplane f + w . (z - x1) = 0, from the current point and from x.
                d1 = project_onto_hyperplane_in_box(flat1, w, f, lower, upper, norm)
                d0 = project_onto_hyperplane_in_box(
                    flat0, w, f + (w * (flat0 - flat1)).sum(dim=1), lower, upper, norm
                )
                size1 = lp_norm(d1, norm).clamp_min(1e-8)
                size0 = lp_norm(d0, norm).clamp_min(1e-8)
                alpha = (size1 / (size1 + size0)).clamp(0.0, self.alpha_max)[:, None]
                # The step, written as a move from x so that immutable features stay exact.
                delta = (1 - alpha) * (flat1 - flat0 + self.eta * d1) + alpha * self.eta * d0
                x1 = threat.clip_bounds(x0 + delta.reshape(x0.shape))
                success = is_adversarial(model(x1), y0, wanted)
                size = lp_norm(x1 - x0, norm)
                better = success & (size < best_norm[index])
                put_rows(best_x, index, better, x1)
                put_rows(best_norm, index, better, size)
                x1 = torch.where(success.reshape(shape), x0 + self.beta * (x1 - x0), x1)
        return best_x, best_norm


def _nearest_in_box(
    x: Tensor, diff: Tensor, w: Tensor, lower: Tensor, upper: Tensor, norm: str
) -> Tensor:
    """Per point, the boundary ``k`` (of ``diff`` (n, K), normals ``w`` (n, K, D)) whose projection
    of the flat point ``x`` (n, D) within the box is shortest; the paper's pick where the box
    reaches none."""
    n, k = diff.shape
    rows = lambda t: t.repeat_interleave(k, dim=0)  # noqa: E731
    step, reached = _project(
        rows(x), w.reshape(n * k, -1), diff.reshape(-1), rows(lower), rows(upper), norm
    )
    size = lp_norm(step, norm).masked_fill(~reached, float("inf")).reshape(n, k)
    paper = (diff.abs() / (dual_norm(w, norm) + 1e-12)).argmin(dim=1)
    return torch.where(torch.isfinite(size).any(dim=1), size.argmin(dim=1), paper)


def _box(threat: ThreatModel, x: Tensor) -> tuple[Tensor, Tensor]:
    """The lower and upper bounds broadcast to the shape of the batch ``x``."""
    lower = torch.as_tensor(threat.lower, dtype=x.dtype, device=x.device).expand_as(x)
    upper = torch.as_tensor(threat.upper, dtype=x.dtype, device=x.device).expand_as(x)
    return lower, upper


@register("fab-t")
class FABT(FAB):
    """Targeted FAB over the most likely classes (FAB-T in AutoAttack; Croce & Hein 2020).

    For each point, FAB follows the boundary of its 2nd most likely class, then its 3rd, ... up to
    ``n_targets`` classes (default: every other class; AutoAttack uses 9), keeping the smallest
    norm found; any misclassification counts as success. With a finite eps a point is not attacked
    towards further classes once it has an adversarial example within eps. With ``target`` given,
    it is targeted FAB towards those classes.

    ``target_order``: ``"logits"`` (the default, AutoAttack's) ranks the other classes by logit;
    ``"malt"`` by MALT's linearised distance to their boundary (Melamed et al., NeurIPS 2024;
    :mod:`~advtrain.attacks.targeting`), nearest first.
    """

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        n_targets: int | None = None,
        target_order: str = "logits",
        steps: int = STEPS,
        alpha_max: float = ALPHA_MAX,
        eta: float = ETA,
        beta: float = BETA,
        nearest: str = "linear",
        **options: Unpack[AttackOptions],
    ) -> None:
        super().__init__(
            threat,
            steps=steps,
            alpha_max=alpha_max,
            eta=eta,
            beta=beta,
            nearest=nearest,
            **options,
        )
        if n_targets is not None:
            check_positive_int("n_targets", n_targets)
        self.n_targets, self.target_order = n_targets, check_target_order(target_order)

    def _hyperparameters(self) -> dict[str, object]:
        return {
            **super()._hyperparameters(),
            "n_targets": self.n_targets,
            "target_order": self.target_order,
        }

    def _minimize_from(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
        radius: Tensor | None,
    ) -> Tensor:
        if target is not None or len(x) == 0:
            return super()._minimize_from(model, x, y, target, generator, radius)
        ranked = ranked_targets(model, x, y, self.n_targets, self.target_order, self.threat.norm)
        count = ranked.shape[1]
        if count < 1:
            return x.clone()
        best_x = x.clone()
        best_norm = torch.full((len(x),), float("inf"), device=x.device, dtype=x.dtype)
        for rank in range(count):
            index = (
                (best_norm > self.threat.eps).nonzero().squeeze(1)
                if self.threat.bounded
                else torch.arange(len(x), device=x.device)
            )
            if len(index) == 0:
                break
            found, norms = self.descend(
                model,
                x[index],
                y[index],
                ranked[index, rank],
                None,
                generator,
                None if radius is None else radius[index],
            )
            better = norms < best_norm[index]
            put_rows(best_x, index, better, found)
            put_rows(best_norm, index, better, norms)
        return best_x
