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
The flattened input is cut into ``blocks`` contiguous blocks (``m_b`` coordinates each) and
each block reduced to its sum ``S_b`` divided by ``w_b = m_b`` (linf), ``sqrt(m_b)`` (l2) or
``1`` (l1). That map shrinks distances in the threat model's own norm:
``|dS_b| / m_b <= ||d||_inf``, ``sum_b dS_b^2 / m_b <= sum_b ||d_b||_2^2 = ||d||_2^2``
(Cauchy-Schwarz in each block) and ``sum_b |dS_b| <= ||d||_1``. So a row inside the eps-ball of
an anchor has block features within ``eps`` of the anchor's, in the same norm (the ball's slack
of :meth:`~advtrain.threat.ThreatModel.contains` and a float-rounding slack added): a necessary
condition, checked on every (row, anchor) pair at ``blocks`` numbers each. The pairs that pass
it are checked exactly by :meth:`~advtrain.threat.ThreatModel.contains` (ball, box, mask and
the table's constraints).

On the CPU every pair that passes the prefilter is checked. Elsewhere
(:func:`~advtrain.device_sync.compaction_interval`) the watch reads nothing back to the host: each
row is checked against its ``candidates`` nearest anchors in block features only, and the rows
with more anchors passing the prefilter than that are counted (:attr:`IterateWatch.overflow`,
read once at the end): only those could be missed.

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
#: Anchors checked exactly per row off the CPU (the nearest in block features).
CANDIDATES = 4
#: (row, anchor) pairs checked exactly at a time: bounds the memory of the exact check.
PAIR_ELEMENTS = 2**24
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
        self._rows: Tensor | None = None  # the first adversarial row of each; one spare row
        self._overflow: Tensor | None = None

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
        if self._found is None or self._rows is None:
            return torch.zeros(0, dtype=torch.int64), self.anchors[:0]
        positions = self._found.nonzero().squeeze(1)
        return positions.cpu(), self._rows[positions]

    @property
    def overflow(self) -> int:
        """Rows (over all calls) with more anchors passing the prefilter than were checked
        exactly (off the CPU only; 0 on the CPU). A read-back: call it at the end."""
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
        """Match the rows of one forward call to the anchors; keep the adversarial ones."""
        if not self._judgeable(inputs, output):
            self.unwatched += 1
            return
        self.watched += 1
        if len(inputs) == 0:
            return
        rows = inputs.detach()
        ready = self._prepared(rows)
        pred = output.detach().argmax(dim=1).to(rows.device)
        if compaction_interval(rows.device) == 1:
            row_of, anchor_of, hit = self._every_candidate(rows, pred, ready)
        else:
            row_of, anchor_of, hit = self._nearest_candidates(rows, pred, ready)
        step = max(1, PAIR_ELEMENTS // max(1, rows[0].numel()))
        inside = [
            self.threat.contains(rows[row_of[i : i + step]], ready.points[anchor_of[i : i + step]])
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
        blocks, coarse, bound = ready.levels[0]
        near = self._distance(self._features(rows, blocks), coarse) <= bound
        row_of, anchor_of = near.nonzero().unbind(dim=1)  # row-major: rows in call order
        keep = (pred[row_of] != ready.labels[anchor_of]) & ~found[anchor_of]
        if len(ready.levels) > 1 and len(row_of):
            blocks, fine, bound = ready.levels[1]
            distance = _norm(
                self._features(rows, blocks)[row_of] - fine[anchor_of], self.threat.norm
            )
            keep &= distance <= bound
        row_of, anchor_of = row_of[keep], anchor_of[keep]
        return row_of, anchor_of, torch.ones_like(row_of, dtype=torch.bool)

    def _nearest_candidates(
        self, rows: Tensor, pred: Tensor, ready: _Anchors
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The accelerator's path, with no read-back: each row's ``candidates`` nearest anchors
        in the finest features, and which of those pass the prefilter and are misclassified."""
        blocks, features, bound = ready.levels[-1]
        distance = self._distance(self._features(rows, blocks), features)
        k = min(self.candidates, len(features))
        nearest_distance, nearest = distance.topk(k, dim=1, largest=False)
        row_of = torch.arange(len(rows), device=rows.device).repeat_interleave(k)
        anchor_of = nearest.reshape(-1)
        hit = (nearest_distance <= bound).reshape(-1) & (pred[row_of] != ready.labels[anchor_of])
        assert self._overflow is not None
        self._overflow += ((distance <= bound).sum(dim=1) > k).sum()
        return row_of, anchor_of, hit

    def _distance(self, rows: Tensor, anchors: Tensor) -> Tensor:
        return torch.cdist(
            rows, anchors, p=_P[self.threat.norm], compute_mode="donot_use_mm_for_euclid_dist"
        )

    def _keep(self, rows: Tensor, row_of: Tensor, anchor_of: Tensor, hit: Tensor) -> None:
        """Per anchor not yet seen broken, keep the first row (in call order) of its hits."""
        found, kept = self._found, self._rows
        assert found is not None and kept is not None
        n, count = len(found), len(rows)
        order = torch.where(hit, row_of, torch.full_like(row_of, count))
        first = torch.full((n,), count, dtype=row_of.dtype, device=row_of.device)
        first = first.scatter_reduce(0, anchor_of, order, "amin")
        new = (first < count) & ~found
        winner = hit & (row_of == first[anchor_of]) & new[anchor_of]
        target = torch.where(winner, anchor_of, torch.full_like(anchor_of, n))  # n: the spare
        step = max(1, PAIR_ELEMENTS // max(1, rows[0].numel()))
        for i in range(0, len(row_of), step):
            kept[target[i : i + step]] = rows[row_of[i : i + step]].to(kept.dtype)
        found |= new

    def _prepared(self, rows: Tensor) -> _Anchors:
        """The anchors, their labels and their block features (coarse, and fine where the
        input has more coordinates than the coarse blocks) with each prefilter's bound, on the
        rows' device, and the state kept there; made at the first call."""
        if self._ready is None or self._ready.points.device != rows.device:
            anchors = self.anchors.to(rows.device)
            eps, size = self.threat.eps, anchors[0].numel()
            levels = []
            coarse = min(self.blocks, math.ceil(size / MIN_BLOCK))
            for blocks in sorted({coarse, min(self.fine_blocks, size)}):
                features = self._features(anchors, blocks)
                scale = _norm(features, self.threat.norm).amax() + eps
                bound = eps + DEFAULT_ATOL * max(1.0, eps) + ROUNDING * (1 + scale)
                levels.append((blocks, features, bound))
            self._ready = _Anchors(anchors, self.labels.to(rows.device), levels)
            n, shape = len(anchors), tuple(anchors.shape[1:])
            if self._found is None or self._rows is None or self._overflow is None:
                self._found = torch.zeros(n, dtype=torch.bool, device=rows.device)
                self._rows = torch.zeros((n + 1, *shape), dtype=anchors.dtype, device=rows.device)
                self._overflow = torch.zeros((), dtype=torch.int64, device=rows.device)
            else:
                self._found = self._found.to(rows.device)
                self._rows = self._rows.to(rows.device)
                self._overflow = self._overflow.to(rows.device)
        return self._ready

    def _features(self, points: Tensor, blocks: int) -> Tensor:
        """Sums over ``blocks`` contiguous blocks of the flattened points (fewer where they do
        not divide evenly), each over its weight ``w_b`` (see the module's docstring)."""
        flat = points.reshape(len(points), -1)
        flat = flat.double() if flat.dtype == torch.float64 else flat.float()
        size = flat.shape[1]
        per = math.ceil(size / max(1, blocks))
        count = math.ceil(size / per)
        padded = torch.nn.functional.pad(flat, (0, count * per - size))
        sums = padded.reshape(len(points), count, per).sum(dim=2)
        members = torch.full((count,), float(per), dtype=flat.dtype, device=flat.device)
        members[-1] = size - per * (count - 1)
        if self.threat.norm == "linf":
            return sums / members
        if self.threat.norm == "l2":
            return sums / members.sqrt()
        return sums


@dataclass
class _Anchors:
    """The anchors on the rows' device, their labels, and per prefilter level (coarse first) the
    blocks, the anchors' block features and the bound a row's features must keep to."""

    points: Tensor
    labels: Tensor
    levels: list[tuple[int, Tensor, Tensor]]  # (blocks asked for, features, bound)


_P = {"linf": float("inf"), "l2": 2.0, "l1": 1.0}


def _norm(features: Tensor, norm: str) -> Tensor:
    return torch.linalg.vector_norm(features, ord=_P[norm], dim=1)


def silent_success(silent: dict[str, list[int]], watched: bool = True) -> Check:
    """The silent-success indicator (Pintor et al., NeurIPS 2022) of a cascade's ``silent``
    (step name -> indices of the points whose adversarial iterate the step visited but did not
    return). A warning: those points were recovered and counted as broken, so the robust
    accuracy stays honest, but the attack is faulty. ``watched=False``: the iterates were not
    watched (a randomised model judged by a majority vote), and the check says so."""
    steps = {step: sorted(index) for step, index in silent.items() if index}
    evidence: dict[str, Any] = {
        "watched": watched,
        "points": sum(len(index) for index in steps.values()),
        "per_step": {
            step: {"points": len(index), "indices": index} for step, index in steps.items()
        },
    }
    if not watched:
        detail = (
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
