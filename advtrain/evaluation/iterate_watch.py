"""Silent success: an attack visited an adversarial point of the threat model but returned another.

Pintor et al., "Indicators of attack failure: debugging and improving optimization of
adversarial examples" (NeurIPS 2022), list *silent success* among the indicators of a faulty
attack: one of its iterates was inside the threat model and misclassified, yet the point it
returned is not adversarial (it returns its last iterate, or a restart's bookkeeping drops the
success). The robust accuracy it reports is then too high although the attack found the point.

:class:`IterateWatch` sees every forward call an attack makes, on one chunk of points (the
*anchors* ``x``, labels ``y``). The output is passed on untouched (gradients flow as before);
without gradients, each input row is matched to the anchors whose threat model contains it, and
a matched row whose output's argmax is not the anchor's label is kept: the first such row seen
per anchor. :func:`silent_success` turns what a cascade recovered that way into a check.

Matching. Attacks call the model on any rows they like (subsets, restarts, shuffled batches, a
search's queries), so a row's position says nothing of its point: a row is matched by its value.
The flattened input is cut into contiguous blocks (``m_b`` coordinates each) and each block
reduced to its sum ``S_b`` divided by ``w_b = m_b`` (linf), ``sqrt(m_b)`` (l2) or ``1`` (l1).
That map shrinks distances in the threat model's own norm:
``|dS_b| / m_b <= ||d||_inf``, ``sum_b dS_b^2 / m_b <= sum_b ||d_b||_2^2 = ||d||_2^2``
(Cauchy-Schwarz in each block) and ``sum_b |dS_b| <= ||d||_1``. So a row inside the eps-ball of
an anchor has block features within ``eps`` of the anchor's, in the same norm (the ball's slack
of :meth:`~advtrain.threat.ThreatModel.contains` and a float-rounding slack added): a necessary
condition. It runs at two levels: coarse blocks (``blocks``, at most 32, of at least
:data:`MIN_BLOCK` coordinates) on every (row, anchor) pair, then fine blocks (``fine_blocks``,
at most 256) on the pairs the coarse level lets through. The pairs that pass both are checked
exactly by :meth:`~advtrain.threat.ThreatModel.contains` (ball, box, mask and the table's
constraints), and a row that passes is judged for that anchor.

The rows of the calls are copied (attacks change their iterates in place) and matched together,
:data:`BUFFER` values at a time and when :meth:`IterateWatch.broken` is asked, so that a call
costs a copy and an argmax. On the CPU every pair that passes the prefilter is checked. Elsewhere
(:func:`~advtrain.device_sync.compaction_interval`) the watch reads nothing back to the host: each
row is checked against at most ``candidates`` anchors (the nearest in fine features among its
:data:`WIDE` nearest in coarse features), and the rows with more anchors passing a level than
that are counted (:attr:`IterateWatch.overflow`, read once at the end): only those could be
missed.

What it cannot judge is not watched: an output that is not ``(N, C)`` logits of the ``N`` rows,
inputs of another sample shape, an unbounded threat model. The argmax of one forward pass is the
judgement of a deterministic model; a randomised model judged by a majority vote cannot be
checked from single passes (its attack model averages passes through EOT).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..device_sync import compaction_interval
from ..threat import DEFAULT_ATOL, ThreatModel
from .findings import WARNING, Check, CheckName

#: Blocks of the coarse and of the fine prefilter (fewer when an input has fewer coordinates).
BLOCKS, FINE_BLOCKS = 32, 256
#: Coordinates a coarse block holds at least (a small input gets fewer coarse blocks).
MIN_BLOCK = 8
#: Anchors checked exactly per row off the CPU (the nearest in the fine features among the
#: :data:`WIDE` nearest in the coarse ones).
CANDIDATES, WIDE = 4, 16
#: Values (rows times coordinates) of the pairs checked exactly at a time, and of the distances
#: worked out at a time off the CPU: bounds the memory the matching takes.
PAIR_ELEMENTS = 2**24
#: Values of the buffered rows of forward calls that are matched together.
BUFFER = 2**22
#: Relative slack of the prefilter for float rounding of the block sums.
ROUNDING = 1e-4
#: Indices named per step in the check's text.
NAMED = 10


class IterateWatch(nn.Module):
    """``model`` watched for adversarial iterates of the points ``x`` (labels ``y``) in ``threat``.

    Called as a wrapper, ``watch(inputs)`` returns ``model(inputs)`` and observes the call;
    ``with watch.hooked():`` observes every call of ``model`` itself instead (a forward hook),
    so the attack gets the model as it is (Square's window pass, for one, applies to an exact
    ``nn.Sequential`` only). :meth:`broken` gives what was seen. See the module's docstring for
    the matching and its bound.
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel,
        *,
        blocks: int = BLOCKS,
        fine_blocks: int = FINE_BLOCKS,
        candidates: int = CANDIDATES,
    ) -> None:
        super().__init__()
        self.model = model
        self.threat = threat
        self.anchors = x.detach()
        self.labels = y.detach()
        self.blocks, self.fine_blocks = int(blocks), int(fine_blocks)
        self.candidates = int(candidates)
        #: forward calls observed, and calls left unwatched (nothing to judge them by)
        self.watched, self.unwatched = 0, 0
        self._ready: _Anchors | None = None
        self._found: Tensor | None = None  # bool per anchor
        self._rows: Tensor | None = None  # the first adversarial row seen of each anchor
        self._overflow: Tensor | None = None
        self._pending: list[tuple[Tensor, Tensor]] = []  # rows and predictions not matched yet
        self._buffered = 0
        self._exact = True  # every pair checked (the CPU's schedule) for the rows buffered

    def forward(self, inputs: Tensor) -> Tensor:
        output = self.model(inputs)
        self.observe(inputs, output)
        return output

    @contextlib.contextmanager
    def hooked(self) -> Iterator[nn.Module]:
        """Observe every forward call of ``model`` while inside; yields ``model``."""
        handle = self.model.register_forward_hook(self._hook)
        try:
            yield self.model
        finally:
            handle.remove()

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if len(args) == 1 and isinstance(args[0], Tensor) and isinstance(output, Tensor):
            self.observe(args[0], output)
        else:
            self.unwatched += 1

    # ------------------------------------------------------------------ what was seen
    def broken(self) -> tuple[Tensor, Tensor]:
        """Positions among the anchors (ascending, int64 on the CPU) seen broken, and for each
        the first adversarial row seen (on the device of the calls)."""
        self._flush()
        if self._found is None or self._rows is None:
            return torch.zeros(0, dtype=torch.int64), self.anchors[:0]
        positions = self._found.nonzero().squeeze(1)
        return positions.cpu(), self._rows[positions]

    @property
    def overflow(self) -> int:
        """Rows (over all calls) with more anchors passing the prefilter than were checked
        exactly (off the CPU only; 0 on the CPU). A read-back: call it at the end."""
        self._flush()
        return 0 if self._overflow is None else int(self._overflow)

    # ------------------------------------------------------------------ matching
    def _judgeable(self, inputs: Tensor, output: Tensor) -> bool:
        return (
            self.threat.bounded
            and len(self.anchors) > 0
            and inputs.is_floating_point()
            and output.dim() == 2
            and output.shape[0] == inputs.shape[0]
            and tuple(inputs.shape[1:]) == tuple(self.anchors.shape[1:])
        )

    @torch.no_grad()
    def observe(self, inputs: Tensor, output: Tensor) -> None:
        """Take the rows of one forward call and their predictions (copied: attacks change
        their iterates in place); they are matched by the batch, :data:`BUFFER` values at a
        time, and at :meth:`broken`."""
        if not self._judgeable(inputs, output):
            self.unwatched += 1
            return
        self.watched += 1
        if len(inputs) == 0:
            return
        exact = compaction_interval(inputs.device) == 1  # the schedule when the call came
        if self._pending and (self._pending[0][0].device != inputs.device or exact != self._exact):
            self._flush()
        self._exact = exact
        self._pending.append((inputs.detach().clone(), output.detach().argmax(dim=1)))
        self._buffered += inputs.numel()
        if self._buffered >= BUFFER:
            self._flush()

    @torch.no_grad()
    def _flush(self) -> None:
        """Match the buffered rows to the anchors, in call order; keep the adversarial ones."""
        if not self._pending:
            return
        rows = torch.cat([r for r, _ in self._pending])
        pred = torch.cat([p for _, p in self._pending]).to(rows.device)
        self._pending, self._buffered = [], 0
        ready = self._prepared(rows)
        if self._exact:
            row_of, anchor_of, hit = self._every_candidate(rows, pred, ready)
        else:
            row_of, anchor_of, hit = self._nearest_candidates(rows, pred, ready)
        step = max(1, PAIR_ELEMENTS // max(1, rows[0].numel()))
        inside = [
            ready.threat.contains(rows[row_of[i : i + step]], ready.points[anchor_of[i : i + step]])
            for i in range(0, len(row_of), step)
        ]
        if inside:
            self._keep(rows, row_of, anchor_of, hit & torch.cat(inside))

    def _every_candidate(
        self, rows: Tensor, pred: Tensor, ready: _Anchors
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The CPU's path: every (row, anchor) pair through the coarse prefilter, then the fine
        one, misclassified for the anchor and of an anchor not yet seen broken, in row order."""
        found = self._found
        assert found is not None
        coarse = ready.levels[0]
        near = self._distance(coarse.of(rows), coarse.features) <= coarse.bound
        row_of, anchor_of = near.nonzero().unbind(dim=1)  # row-major: rows in call order
        keep = (pred[row_of] != ready.labels[anchor_of]) & ~found[anchor_of]
        if len(ready.levels) > 1 and len(row_of):
            keep &= ready.levels[1].near(rows, row_of, anchor_of)
        row_of, anchor_of = row_of[keep], anchor_of[keep]
        return row_of, anchor_of, torch.ones_like(row_of, dtype=torch.bool)

    def _nearest_candidates(
        self, rows: Tensor, pred: Tensor, ready: _Anchors
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The accelerator's path, with no read-back: each row's :data:`WIDE` nearest anchors in
        the coarse features, of those the ``candidates`` nearest in the fine features that pass
        both prefilters, and whether they are misclassified."""
        coarse, fine = ready.levels[0], ready.levels[-1]
        distance = self._distance(coarse.of(rows), coarse.features)
        wide = min(WIDE, len(coarse.features))
        coarse_distance, nearest = distance.topk(wide, dim=1, largest=False)
        passing = coarse_distance <= coarse.bound
        if fine is not coarse:
            near = _norm(fine.of(rows)[:, None] - fine.features[nearest], fine.norm)
            passing &= near <= fine.bound
        else:
            near = coarse_distance
        k = min(self.candidates, wide)
        fine_distance, pick = near.masked_fill(~passing, float("inf")).topk(k, dim=1, largest=False)
        row_of = torch.arange(len(rows), device=rows.device)[:, None].expand(-1, k).reshape(-1)
        anchor_of = nearest.gather(1, pick).reshape(-1)
        hit = fine_distance.isfinite().reshape(-1) & (pred[row_of] != ready.labels[anchor_of])
        assert self._overflow is not None
        self._overflow += ((distance <= coarse.bound).sum(dim=1) > wide).sum()
        self._overflow += (passing.sum(dim=1) > k).sum()
        return row_of, anchor_of, hit

    def _distance(self, rows: Tensor, anchors: Tensor) -> Tensor:
        """Distances of every row to every anchor in the threat model's norm: ``cdist`` on the
        CPU; elsewhere the differences, a bounded slice of rows at a time (faster there)."""
        p = _P[self.threat.norm]
        if rows.device.type == "cpu":
            return torch.cdist(rows, anchors, p=p, compute_mode="donot_use_mm_for_euclid_dist")
        step = max(1, PAIR_ELEMENTS // max(1, anchors.numel()))
        return torch.cat(
            [
                torch.linalg.vector_norm(part[:, None] - anchors[None], ord=p, dim=2)
                for part in rows.split(step)
            ]
        )

    def _keep(self, rows: Tensor, row_of: Tensor, anchor_of: Tensor, hit: Tensor) -> None:
        """Per anchor not yet seen broken, keep the first row (in call order) of its hits."""
        found, kept = self._found, self._rows
        assert found is not None and kept is not None
        count = len(rows)
        order = torch.where(hit, row_of, torch.full_like(row_of, count))
        first = torch.full((len(found),), count, dtype=row_of.dtype, device=row_of.device)
        first = first.scatter_reduce(0, anchor_of, order, "amin")
        new = (first < count) & ~found
        step = max(1, PAIR_ELEMENTS // max(1, rows[0].numel()))
        for i in range(0, len(found), step):
            part = slice(i, i + step)
            chosen = rows[first[part].clamp(max=count - 1)].to(kept.dtype)
            kept[part] = torch.where(
                new[part].reshape((-1,) + (1,) * (rows.dim() - 1)), chosen, kept[part]
            )
        found |= new

    def _prepared(self, rows: Tensor) -> _Anchors:
        """The anchors, their labels, the prefilter's levels and the threat model on the rows'
        device (its bounds and mask moved there once, so that checks copy nothing from the
        host), and the state kept there; made at the first call."""
        if self._ready is None or self._ready.points.device != rows.device:
            device = rows.device
            anchors = self.anchors.to(device)
            size = anchors[0].numel()
            coarse = min(self.blocks, math.ceil(size / MIN_BLOCK))
            levels = [
                _Level.of_anchors(anchors, blocks, self.threat)
                for blocks in sorted({coarse, min(self.fine_blocks, size)})
            ]
            threat = self.threat
            if device.type != "cpu":
                threat = threat.replace(
                    lower=torch.as_tensor(threat.lower, dtype=torch.float32).to(device),
                    upper=torch.as_tensor(threat.upper, dtype=torch.float32).to(device),
                    mask=None if threat.mask is None else threat.mask.to(device),
                )
            self._ready = _Anchors(anchors, self.labels.to(device), levels, threat)
            n, shape = len(anchors), tuple(anchors.shape[1:])
            if self._found is None or self._rows is None or self._overflow is None:
                self._found = torch.zeros(n, dtype=torch.bool, device=device)
                self._rows = torch.zeros((n, *shape), dtype=anchors.dtype, device=device)
                self._overflow = torch.zeros((), dtype=torch.int64, device=device)
            else:
                self._found = self._found.to(device)
                self._rows = self._rows.to(device)
                self._overflow = self._overflow.to(device)
        return self._ready


@dataclass
class _Level:
    """One prefilter: sums over ``blocks`` contiguous blocks of the flattened points (fewer where
    they do not divide evenly), each over its weight ``w_b`` (see the module's docstring); the
    anchors' features, and the bound a row's must keep to."""

    norm: str
    per: int  # coordinates per block (the last block may hold fewer)
    weights: Tensor
    features: Tensor
    bound: Tensor

    @classmethod
    def of_anchors(cls, anchors: Tensor, blocks: int, threat: ThreatModel) -> _Level:
        size = anchors[0].numel()
        per = math.ceil(size / max(1, blocks))
        count = math.ceil(size / per)
        members = torch.full((count,), float(per))
        members[-1] = size - per * (count - 1)
        power = {"linf": 1.0, "l2": 0.5, "l1": 0.0}[threat.norm]
        dtype = torch.float64 if anchors.dtype == torch.float64 else torch.float32
        weights = members.pow(power).to(anchors.device, dtype)
        features = _block_features(anchors, per, weights)
        eps = threat.eps
        scale = _norm(features, threat.norm).amax() + eps
        bound = eps + DEFAULT_ATOL * max(1.0, eps) + ROUNDING * (1 + scale)
        return cls(threat.norm, per, weights, features, bound)

    def of(self, points: Tensor) -> Tensor:
        """The block features of ``points``."""
        return _block_features(points, self.per, self.weights)

    def near(self, rows: Tensor, row_of: Tensor, anchor_of: Tensor) -> Tensor:
        """Whether each (row, anchor) pair passes this prefilter."""
        distance = _norm(self.of(rows)[row_of] - self.features[anchor_of], self.norm)
        return distance <= self.bound


@dataclass
class _Anchors:
    """What the watch matches against, on the rows' device: the anchors, their labels, the
    prefilter's levels (coarse first) and the threat model."""

    points: Tensor
    labels: Tensor
    levels: list[_Level]
    threat: ThreatModel


def _block_features(points: Tensor, per: int, weights: Tensor) -> Tensor:
    """Sums over blocks of ``per`` contiguous coordinates of the flattened points (zeros pad the
    last block), each over its weight."""
    flat = points.reshape(len(points), -1).to(weights.dtype)
    padded = torch.nn.functional.pad(flat, (0, len(weights) * per - flat.shape[1]))
    return padded.reshape(len(points), len(weights), per).sum(dim=2) / weights


_P = {"linf": float("inf"), "l2": 2.0, "l1": 1.0}


def _norm(features: Tensor, norm: str) -> Tensor:
    return torch.linalg.vector_norm(features, ord=_P[norm], dim=-1)


def silent_success(
    silent: dict[str, list[int]], watched: bool = True, why_not: str | None = None
) -> Check:
    """The silent-success indicator (Pintor et al., NeurIPS 2022) of a cascade's ``silent``
    (step name -> indices of the points whose adversarial iterate the step visited but did not
    return). A warning: those points were recovered and counted as broken, so the robust
    accuracy stays honest, but the attack is faulty. ``watched=False``: the iterates were not
    watched (a randomised model judged by a majority vote, or ``why_not``), and the check says
    so."""
    steps = {step: sorted(index) for step, index in silent.items() if index}
    evidence: dict[str, Any] = {
        "watched": watched,
        "points": sum(len(index) for index in steps.values()),
        "per_step": {
            step: {"points": len(index), "indices": index} for step, index in steps.items()
        },
    }
    if not watched:
        detail = why_not or (
            "not checked: a majority-vote judge cannot be checked from single forward passes "
            "(the iterates of a randomised model were not watched)"
        )
        return Check(CheckName.SILENT_SUCCESS, False, detail, WARNING, evidence)
    if not steps:
        detail = "no attack visited an adversarial point of the threat model without returning it"
        return Check(CheckName.SILENT_SUCCESS, False, detail, WARNING, evidence)
    parts = []
    for step, index in steps.items():
        shown = ", ".join(map(str, index[:NAMED])) + (", ..." if len(index) > NAMED else "")
        parts.append(f"{step}: {len(index)} point(s) (indices {shown})")
    detail = (
        "attacks visited an adversarial point inside the threat model but returned a point that "
        f"is not adversarial: {'; '.join(parts)}. The visited points were recovered and counted "
        "as broken (the robust accuracy includes them); the attacks' own results are weaker "
        "than their search"
    )
    return Check(CheckName.SILENT_SUCCESS, True, detail, WARNING, evidence)
