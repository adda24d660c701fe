"""What makes an encoded table row one that could really be submitted: feature constraints.

A table is attacked in its encoded form ``z`` (see :mod:`advtrain.data.table_encoding`):
continuous and integer columns min-max scaled into [0, 1], binary columns as 0/1, categorical
columns one-hot. Each coordinate maps back to raw units by ``raw = offset + scale * z``.
:class:`FeatureConstraints` holds what an attacker must respect beyond the ``eps``-ball, the
bounds and the immutable columns (which :class:`~advtrain.threat.ThreatModel` already knows):

* integer (and binary) columns end on integers in raw units;
* a categorical column stays exactly one-hot;
* a column with a direction may only increase (``+1``) or only decrease (``-1``);
* linear rules between columns hold: ``rule_coefficients @ raw <= rule_bounds``.

:meth:`FeatureConstraints.repair` maps any point of the ball to a feasible one, the repair step
that Simonetto et al.'s constrained attacks (CAPGD/CAA, "Constrained adaptive attack: effective
adversarial attack against deep neural networks for tabular data", NeurIPS 2024) apply inside
the attack loop. Theirs fixes equality constraints and types and leaves inequalities to a
penalty and a final filter; this one guarantees every rule, in three moves:

1. each one-hot group becomes the one-hot vector of its largest coordinate;
2. for each rule the step breaks, only the coordinates that push it over its bound are scaled
   back onto it (a few passes, since shrinking one coordinate can break a rule it helped);
   then the numeric part of the perturbation is shrunk along the segment from the clean point
   to the largest step ``t`` in [0, 1] for which every linear rule holds (exact for linear
   rules, because the clean point satisfies them and the feasible set is convex);
3. integer coordinates are rounded to the nearest integer; a row that leaves the ball, the box
   or a rule by rounding is rounded towards the clean value instead, and if that still breaks a
   rule the step is halved and tried again. Rounding towards the clean value only shrinks each
   coordinate of the perturbation, and at ``t = 0`` the row is the clean row itself.

So the output is feasible whenever the clean row is. A clean row that already breaks a rule
cannot be repaired into one that holds; :meth:`feasible` reports such rows as infeasible, and the
evaluation never counts them as broken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .errors import ThreatModelError

if TYPE_CHECKING:
    from .threat import ThreatModel

#: Passes over the rules that shrink only the coordinates pushing a broken rule.
RULE_PASSES = 4
#: Halvings of the step tried in the repair before a row falls back to its clean value.
REPAIR_HALVINGS = 8
#: Relative slack for a rule in float32 arithmetic: ``coef @ raw <= bound + slack``.
RULE_RTOL = 1e-5
#: The repair aims this much inside each rule (relative), so float32 rounding keeps it feasible.
RULE_HEADROOM = 1e-6


@dataclass(frozen=True, eq=False)
class FeatureConstraints:
    """The constraints of an encoded table row beyond ball, bounds and mask.

    Args:
        offset, scale: float64 ``(d,)``; ``raw = offset + scale * z`` (``scale > 0``).
        integer: bool ``(d,)``, True where the raw value must be an integer (integer and binary
            columns).
        direction: int8 ``(d,)``: ``+1`` may only increase, ``-1`` may only decrease, ``0`` any.
        groups: one ``(start, stop)`` coordinate range per categorical column (its one-hot).
        rule_coefficients: float64 ``(r, d)`` in raw units; categorical coordinates have 0.
        rule_bounds: float64 ``(r,)``: rule ``i`` holds when ``coef[i] @ raw <= bound[i]``.
        rules: the rules as the user wrote them, for messages and the report.
        names: one name per coordinate (``"channel=web"`` for a one-hot coordinate).
    """

    offset: Tensor
    scale: Tensor
    integer: Tensor
    direction: Tensor
    groups: tuple[tuple[int, int], ...] = ()
    rule_coefficients: Tensor | None = None
    rule_bounds: Tensor | None = None
    rules: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    _moved: dict[tuple[str, torch.device], Tensor] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        d = int(torch.as_tensor(self.offset).numel())
        set_ = object.__setattr__
        set_(self, "offset", torch.as_tensor(self.offset, dtype=torch.float64).reshape(d))
        set_(self, "scale", torch.as_tensor(self.scale, dtype=torch.float64).reshape(-1))
        set_(self, "integer", torch.as_tensor(self.integer, dtype=torch.bool).reshape(-1))
        set_(self, "direction", torch.as_tensor(self.direction, dtype=torch.int8).reshape(-1))
        coefficients = (
            torch.zeros((0, d)) if self.rule_coefficients is None else self.rule_coefficients
        )
        bounds = torch.zeros(0) if self.rule_bounds is None else self.rule_bounds
        set_(self, "rule_coefficients", torch.as_tensor(coefficients, dtype=torch.float64))
        set_(self, "rule_bounds", torch.as_tensor(bounds, dtype=torch.float64).reshape(-1))
        set_(self, "groups", tuple((int(a), int(b)) for a, b in self.groups))
        set_(self, "rules", tuple(self.rules))
        set_(self, "names", tuple(self.names))
        set_(self, "_moved", {})
        for name in ("scale", "integer", "direction"):
            if getattr(self, name).numel() != d:
                raise ThreatModelError(
                    f"constraints: {name} has {getattr(self, name).numel()} "
                    f"entries for {d} features"
                )
        if not bool((self.scale > 0).all()):
            raise ThreatModelError("constraints: every scale must be > 0")
        if not bool(((self.direction >= -1) & (self.direction <= 1)).all()):
            raise ThreatModelError("constraints: direction must be -1, 0 or +1")
        if self.coefficients.shape != (self.bounds.numel(), d):
            raise ThreatModelError(
                f"constraints: rule coefficients of shape {tuple(self.coefficients.shape)} do not "
                f"fit {self.bounds.numel()} rules over {d} features"
            )
        for start, stop in self.groups:
            if not 0 <= start < stop <= d:
                raise ThreatModelError(f"constraints: one-hot group [{start}, {stop}) out of range")
        if self.names and len(self.names) != d:
            raise ThreatModelError(f"constraints: {len(self.names)} names for {d} features")

    # ------------------------------------------------------------------ views
    @property
    def n_features(self) -> int:
        """Width ``d`` of an encoded row."""
        return int(self.offset.numel())

    @property
    def coefficients(self) -> Tensor:
        """The rules' coefficients, float64 ``(r, d)``."""
        assert self.rule_coefficients is not None  # set in __post_init__
        return self.rule_coefficients

    @property
    def bounds(self) -> Tensor:
        """The rules' right-hand sides, float64 ``(r,)``."""
        assert self.rule_bounds is not None  # set in __post_init__
        return self.rule_bounds

    def _name(self, i: int) -> str:
        return self.names[i] if self.names else str(i)

    def describe(self) -> dict[str, Any]:
        """The constraint set, JSON-able, for the report."""
        return {
            "rules": list(self.rules),
            "integer": [self._name(i) for i in torch.nonzero(self.integer).flatten().tolist()],
            "one_hot": [[self._name(i) for i in range(a, b)] for a, b in self.groups],
            "increase_only": [
                self._name(i) for i in torch.nonzero(self.direction > 0).flatten().tolist()
            ],
            "decrease_only": [
                self._name(i) for i in torch.nonzero(self.direction < 0).flatten().tolist()
            ],
        }

    def check_shape(self, x: Tensor) -> None:
        """Refuse a batch that is not ``(n, d)`` encoded rows."""
        if x.dim() != 2 or x.shape[1] != self.n_features:
            raise ThreatModelError(
                f"table constraints are for rows of {self.n_features} encoded features, got "
                f"inputs of shape {tuple(x.shape)}"
            )

    # ------------------------------------------------------------------ raw units
    def _here(self, name: str, device: torch.device) -> Tensor:
        """The float64/bool/int8 tensor ``name`` on ``device``, moved once per device."""
        key = (name, device)
        cached = self._moved.get(key)
        if cached is None:
            cached = self._moved[key] = getattr(self, name).to(device)
        return cached

    def _on(self, like: Tensor) -> tuple[Tensor, Tensor]:
        return self._here("offset", like.device), self._here("scale", like.device)

    def to_raw(self, z: Tensor) -> Tensor:
        """Raw values (float64) of encoded rows."""
        offset, scale = self._on(z)
        return offset + scale * z.to(torch.float64)

    def from_raw(self, raw: Tensor, like: Tensor) -> Tensor:
        """Encoded rows of raw values, in ``like``'s dtype."""
        offset, scale = self._on(raw)
        return ((raw - offset) / scale).to(like.dtype)

    def _rule_excess(self, raw: Tensor) -> Tensor:
        """``coef @ raw - bound`` minus the float slack, ``(n, r)``: > 0 where a rule breaks."""
        coefficients = self._here("rule_coefficients", raw.device)
        bounds = self._here("rule_bounds", raw.device)
        value = raw @ coefficients.T
        slack = RULE_RTOL * (1.0 + raw.abs() @ coefficients.abs().T + bounds.abs())
        return value - bounds - slack

    def _integer_tolerance(self, like: Tensor) -> Tensor:
        """Largest distance to an integer that float32 storage of ``z`` can explain."""
        _, scale = self._on(like)
        return 1e-6 + 5e-7 * scale

    # ------------------------------------------------------------------ checks
    def violations(self, x_adv: Tensor, x: Tensor) -> dict[str, Tensor]:
        """Per-row bools ``(n,)``, True where ``x_adv`` breaks a kind of constraint."""
        self.check_shape(x_adv)
        raw = self.to_raw(x_adv)
        integer = self._here("integer", x_adv.device)
        off_integer = (raw - raw.round()).abs() > self._integer_tolerance(x_adv)
        broken_integer = (off_integer & integer).any(dim=1)
        broken_one_hot = torch.zeros(x_adv.shape[0], dtype=torch.bool, device=x_adv.device)
        for start, stop in self.groups:
            group = x_adv[:, start:stop]
            binary = ((group - group.round()).abs() <= 1e-5).all(dim=1)
            ones = (group.round().sum(dim=1) - 1).abs() <= 0.5
            broken_one_hot |= ~(binary & ones)
        direction = self.direction.to(x_adv.device, torch.float64)
        delta = (x_adv - x).to(torch.float64)
        broken_direction = ((delta * direction) < -1e-6).any(dim=1)
        if self.bounds.numel():
            broken_rules = (self._rule_excess(raw) > 0).any(dim=1)
        else:
            broken_rules = torch.zeros_like(broken_integer)
        return {
            "integer": broken_integer,
            "one_hot": broken_one_hot,
            "direction": broken_direction,
            "rules": broken_rules,
        }

    def feasible(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per-row bool ``(n,)``: ``x_adv`` satisfies every constraint (relative to clean ``x``)."""
        broken = self.violations(x_adv, x)
        any_broken = torch.zeros(x_adv.shape[0], dtype=torch.bool, device=x_adv.device)
        for value in broken.values():
            any_broken |= value
        return ~any_broken

    # ------------------------------------------------------------------ projection
    def orient(self, delta: Tensor) -> Tensor:
        """Zero the parts of a perturbation that go against a column's direction."""
        if not bool((self.direction != 0).any()):
            return delta
        direction = self.direction.to(delta.device, delta.dtype)
        allowed = (delta * direction >= 0) | (direction == 0)
        return delta * allowed

    def _one_hot(self, point: Tensor, x: Tensor) -> Tensor:
        """Each group as the one-hot vector of its largest coordinate; immutable groups are
        already clean, and a group whose clean coordinates already win stays clean."""
        if not self.groups:
            return point
        point = point.clone()
        for start, stop in self.groups:
            group = point[:, start:stop]
            winner = group.argmax(dim=1)
            point[:, start:stop] = torch.nn.functional.one_hot(winner, stop - start).to(point.dtype)
        return point

    def _relax_rules(self, raw_x: Tensor, raw_delta: Tensor) -> Tensor:
        """Shrink, rule by rule, only the coordinates that push a broken rule over its bound.

        For a rule the full step breaks, the coordinates whose change raises its left-hand side
        are scaled by the one factor that brings it back to its bound (a coordinate pushing
        several broken rules takes the smallest factor); the others keep their change, so one
        tight rule (``tx_1h <= tx_24h`` at equality, say) does not freeze the columns it does not
        name. Shrinking a coordinate can break a rule it was helping, so this is repeated a few
        times; whatever is left is the segment's business.
        """
        if not self.bounds.numel():
            return raw_delta
        coefficients = self._here("rule_coefficients", raw_x.device)
        bounds = self._here("rule_bounds", raw_x.device)
        headroom = RULE_HEADROOM * (1.0 + raw_x.abs() @ coefficients.abs().T + bounds.abs())
        room = bounds - raw_x @ coefficients.T - headroom  # (n, r)
        for _ in range(RULE_PASSES):
            contribution = raw_delta.unsqueeze(1) * coefficients  # (n, r, d)
            rises = contribution.clamp_min(0).sum(dim=2)
            falls = contribution.clamp_max(0).sum(dim=2)
            broken = rises + falls > room  # (n, r)
            if not bool(broken.any()):
                break
            factor = ((room - falls) / rises.clamp_min(1e-300)).clamp(0.0, 1.0)
            # every coordinate takes the smallest factor of the broken rules it pushes
            pushing = broken.unsqueeze(2) & (contribution > 0)
            scale = torch.where(pushing, factor.unsqueeze(2), 1.0).amin(dim=1)
            raw_delta = raw_delta * scale
        return raw_delta

    def _step_limit(self, raw_x: Tensor, raw_delta: Tensor) -> Tensor:
        """Largest ``t`` in [0, 1] per row with every rule holding at ``raw_x + t * raw_delta``."""
        n = raw_x.shape[0]
        if not self.bounds.numel():
            return torch.ones(n, dtype=raw_x.dtype, device=raw_x.device)
        coefficients = self._here("rule_coefficients", raw_x.device)
        bounds = self._here("rule_bounds", raw_x.device)
        headroom = RULE_HEADROOM * (1.0 + raw_x.abs() @ coefficients.abs().T + bounds.abs())
        room = bounds - raw_x @ coefficients.T - headroom  # (n, r)
        push = raw_delta @ coefficients.T  # (n, r)
        limits = torch.where(push > 0, room.clamp_min(0) / push.clamp_min(1e-300), 1.0)
        return limits.amin(dim=1).clamp(0.0, 1.0)

    def repair(self, x_adv: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
        """A feasible point for ``x_adv`` (already in ``threat``'s ball, box and mask).

        Tried first with the categories ``x_adv`` chose, then, for the rows where no step
        fits (a category switch can take the whole ball), with the clean categories.
        """
        self.check_shape(x_adv)
        dtype = x_adv.dtype
        x_adv = self._one_hot(x_adv, x)
        categorical = torch.zeros(self.n_features, dtype=torch.bool, device=x.device)
        for start, stop in self.groups:
            categorical[start:stop] = True
        raw_x = self.to_raw(x)
        raw_delta = self.to_raw(x_adv) - raw_x
        raw_delta = torch.where(categorical, torch.zeros_like(raw_delta), raw_delta)
        result = x.clone()
        pending = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for categories in (torch.where(categorical, x_adv, x), x):
            result, pending = self._search_step(
                result, pending, categories, categorical, raw_x, raw_delta, x, threat
            )
            if not self.groups or not bool(pending.any()):
                break
        return result.to(dtype)

    def _search_step(
        self,
        result: Tensor,
        pending: Tensor,
        categories: Tensor,
        categorical: Tensor,
        raw_x: Tensor,
        raw_delta: Tensor,
        x: Tensor,
        threat: ThreatModel,
    ) -> tuple[Tensor, Tensor]:
        """Moves 2 and 3 of the repair for the ``pending`` rows; returns the rows still pending."""
        integer = self._here("integer", x.device)
        clean_integer = raw_x.round()
        raw_delta = self._relax_rules(raw_x, raw_delta)
        step = self._step_limit(raw_x, raw_delta)
        for _ in range(REPAIR_HALVINGS):
            raw = raw_x + step.unsqueeze(1) * raw_delta
            nearest = torch.where(integer, raw.round(), raw)
            towards = torch.where(integer, clean_integer + (raw - clean_integer).trunc(), raw)
            for candidate_raw in (nearest, towards):
                candidate = torch.where(categorical, categories, self.from_raw(candidate_raw, x))
                ok = pending & self._holds(candidate, x, threat)
                result = torch.where(ok.unsqueeze(1), candidate, result)
                pending = pending & ~ok
                if not bool(pending.any()):
                    return result, pending
            if not bool(pending.any()):
                break
            step = step / 2
        return result, pending

    def _holds(self, candidate: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
        """Rows of ``candidate`` inside the threat's ball, box and mask that break no rule."""
        inside = threat.contains_unconstrained(candidate, x)
        if self.bounds.numel():
            inside = inside & ~(self._rule_excess(self.to_raw(candidate)) > 0).any(dim=1)
        return inside
