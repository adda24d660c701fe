"""Interval bound propagation and CROWN's backward linear relaxation over a parsed network.

**IBP** (Gowal et al., "On the effectiveness of interval bound propagation for training
verifiably robust models", 2018): a box is pushed through the layers, an affine layer mapping
centre ``c`` and radius ``r`` to ``W c + b`` and ``|W| r``, a ReLU clamping both ends at 0.
:func:`interval_trace` records the box at the input of every operation.

**CROWN** (Zhang, Weng, Chen, Hsieh & Daniel, "Efficient neural network robustness
certification with general activation functions", NeurIPS 2018): rows of linear coefficients
``a`` over some layer are taken back through the network (:func:`backward_lower`); at a ReLU
whose input lies in ``[l, u]`` with ``l < 0 < u`` the rows' positive part goes through the lower
line ``alpha * x`` and their negative part through the upper line
``u / (u - l) * (x - l)``; ``alpha`` is CROWN's adaptive choice, 1 when ``u >= -l`` and 0
otherwise. Active units (``l >= 0``) pass the rows through, dead ones (``u <= 0``) zero them. At
the input the rows are minimised over the threat model's set
(:meth:`~advtrain.certify.input_set.InputSet.concretize_lower`), or over a box of an
intermediate layer when the walk stops there (IBP with the last affine layers folded into the
specification, as Gowal et al. do with the margin matrix).

The ReLU lines need bounds on every ReLU's input. CROWN-IBP (Zhang et al., "Towards stable and
efficient training of verifiably robust neural networks", ICLR 2020) takes them from IBP;
full CROWN computes them with CROWN itself, layer after layer (``tighten=True``): each layer's
box comes from IBP on the previous (tightened) box and is then tightened by a backward pass for
the units IBP leaves unstable in some sample of the batch (only those shape the next
relaxations; a tightened bound is the better of the IBP and the CROWN one, both sound).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .input_set import InputSet
from .operations import (
    AddOp,
    AffineOp,
    AvgPoolOp,
    Conv2dOp,
    FlattenOp,
    LinearOp,
    MeanPoolOp,
    Network,
    ReLUOp,
)

__all__ = ["Box", "backward_lower", "interval_trace"]

Box = tuple[Tensor, Tensor]

#: At most this many floats in one tensor of rows ``a`` while tightening (chunks of units).
ROW_BUDGET = 1 << 25


def interval_trace(network: Network, inputs: InputSet, tighten: bool = False) -> list[Box]:
    """The box of every node (node 0 the input, node ``i + 1`` the output of op ``i``). IBP,
    except that with an l2 ball the first Linear/Conv2d (after flattening only) also bounds each
    unit over the ball, ``w x + b +- eps ||w * mask||_2``, keeping the better side of each
    bound; with ``tighten`` every node a ReLU reads is tightened by CROWN (full CROWN's
    intermediate bounds) unless its box is already each unit's exact range (one feature-mixing
    layer from the input: CROWN would give the same)."""
    boxes: list[Box] = [(inputs.lower, inputs.upper)]
    leading = True  # only flattening so far: the l2 ball is still a ball of the same radius
    exact, mixed = True, False  # every unit's box is its exact range; a mixing layer passed
    for index, (op, sources) in enumerate(zip(network.ops, network.sources)):
        lower, upper = boxes[sources[0]]
        if isinstance(op, ReLUOp):
            boxes.append((lower.clamp_min(0), upper.clamp_min(0)))
            leading = exact = False
            continue
        if isinstance(op, AddOp):
            other_lower, other_upper = boxes[sources[1]]
            boxes.append((lower + other_lower, upper + other_upper))
            leading = exact = False
            continue
        assert isinstance(op, AffineOp)
        lower, upper = op.interval(lower, upper)
        ball = leading and inputs.norm == "l2" and isinstance(op, (LinearOp, Conv2dOp))
        if ball:
            lower, upper = _ball_bounds(network, index, inputs, lower, upper)
        if isinstance(op, (LinearOp, Conv2dOp, AvgPoolOp, MeanPoolOp)):
            exact = exact and not mixed and (inputs.norm == "linf" or ball)
            mixed = True
        leading = leading and isinstance(op, FlattenOp)
        if tighten and not exact and network.feeds_relu(index + 1):
            lower, upper = _tighten(network, index + 1, boxes, inputs, lower, upper)
        boxes.append((lower, upper))
    return boxes


def _ball_bounds(
    network: Network, index: int, inputs: InputSet, lower: Tensor, upper: Tensor
) -> Box:
    """The box of op ``index``'s output intersected with its range over the l2 ball alone."""
    centre, mask = inputs.centre, inputs.sample_mask()
    for op in network.ops[:index]:  # flattening only
        assert isinstance(op, FlattenOp)
        centre, mask = op.apply(centre), mask.flatten()
    op = network.ops[index]
    assert isinstance(op, (LinearOp, Conv2dOp))
    middle, spread = op.apply(centre), inputs.eps * op.row_norms(mask)
    return torch.maximum(lower, middle - spread), torch.minimum(upper, middle + spread)


def _tighten(
    network: Network, node: int, boxes: list[Box], inputs: InputSet, lower: Tensor, upper: Tensor
) -> Box:
    """``[lower, upper]`` (the box of ``node``, which a ReLU reads) tightened by CROWN, for each
    sample on the units unstable there.

    The rows of those units go back to the nearest ReLUs once for the batch (over the units
    unstable in any sample: nothing on the way depends on the sample); each sample then takes
    its own rows on through the rest of the network, in chunks that keep the rows within
    :data:`ROW_BUDGET`."""
    flat_lower, flat_upper = lower.flatten(1), upper.flatten(1)
    unstable = (flat_lower < 0) & (flat_upper > 0)
    union = unstable.any(0).nonzero().squeeze(1)
    if union.numel() == 0:
        return lower, upper
    eye = torch.zeros(len(union), flat_lower.shape[1], dtype=lower.dtype, device=lower.device)
    eye[torch.arange(len(union), device=eye.device), union] = 1
    shared = {node: eye.reshape(1, len(union), *lower.shape[1:])}
    bias = eye.new_zeros(1, len(union))
    stop = _walk(network, shared, bias, boxes, node - 1, until_relu=True)
    if stop < 0:  # affine layers only: the rows are the same for every sample
        rows, bias = shared.pop(0), shared.pop(-1)
        found_lower = inputs.concretize_lower(rows, bias)
        found_upper = -inputs.concretize_lower(-rows, -bias)
        flat_lower = flat_lower.index_copy(
            1, union, torch.maximum(flat_lower.index_select(1, union), found_lower)
        )
        flat_upper = flat_upper.index_copy(
            1, union, torch.minimum(flat_upper.index_select(1, union), found_upper)
        )
        return flat_lower.reshape(lower.shape), flat_upper.reshape(upper.shape)
    bias = shared.pop(-1)
    # each sample's unstable units, as positions in the union (padded with invalid ones)
    in_union = unstable.index_select(1, union)
    counts = in_union.sum(1)
    width = int(counts.max())
    positions = torch.argsort((~in_union).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=counts.device) < counts.unsqueeze(1)
    widest = max(math.prod(box[0].shape[1:]) for box in boxes[: stop + 1])
    per_chunk = max(1, ROW_BUDGET // (2 * len(flat_lower) * widest))
    for first in range(0, width, per_chunk):
        where, ok = positions[:, first : first + per_chunk], valid[:, first : first + per_chunk]
        pending = {}
        for at, rows in shared.items():
            part = rows[0][where] * ok.reshape(*ok.shape, *(1,) * (rows.dim() - 2))
            pending[at] = torch.cat([part, -part], 1)
        part_bias = bias[0][where] * ok
        found = _finish(
            network, pending, torch.cat([part_bias, -part_bias], 1), boxes, inputs, stop
        )
        count, units = where.shape[1], union[where]
        inf = torch.full_like(part_bias, math.inf)
        new_lower = torch.where(ok, found[:, :count], -inf)
        new_upper = torch.where(ok, -found[:, count:], inf)
        flat_lower = flat_lower.scatter_reduce(1, units, new_lower, "amax")
        flat_upper = flat_upper.scatter_reduce(1, units, new_upper, "amin")
    return flat_lower.reshape(lower.shape), flat_upper.reshape(upper.shape)


def relaxation(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CROWN's lines for ReLUs with inputs in ``[lower, upper]``: ``(lower_slope, upper_slope,
    upper_intercept)`` (the lower line passes through the origin)."""
    active, unstable = lower >= 0, (lower < 0) & (upper > 0)
    width = (upper - lower).clamp_min(1e-12)
    one, zero = torch.ones_like(lower), torch.zeros_like(lower)
    upper_slope = torch.where(active, one, torch.where(unstable, upper / width, zero))
    upper_intercept = torch.where(unstable, -lower * upper / width, zero)
    lower_slope = torch.where(active | (unstable & (upper >= -lower)), one, zero)
    return lower_slope, upper_slope, upper_intercept


def _walk(
    network: Network,
    pending: dict[int, Tensor],
    bias: Tensor,
    boxes: list[Box],
    last: int,
    start: int = 0,
    until_relu: bool = False,
) -> int:
    """Take the rows ``pending`` (node -> rows over it) back through ops ``last`` down to
    ``start`` (CROWN's lines at the ReLUs, for a lower bound), in place; their constants go to
    ``pending[-1]`` (``bias`` added). With ``until_relu``, stop before the first ReLU met and
    return its index; otherwise return ``start - 1``."""
    for index in range(last, start - 1, -1):
        rows = pending.get(index + 1)
        if rows is None:
            continue
        op, sources = network.ops[index], network.sources[index]
        if until_relu and isinstance(op, ReLUOp):
            pending[-1] = bias
            return index
        del pending[index + 1]
        lower, upper = boxes[sources[0]]
        if isinstance(op, ReLUOp):
            lower_slope, upper_slope, intercept = relaxation(lower, upper)
            negative = rows.clamp_max(0)  # these go through the upper line
            slopes = (upper_slope - lower_slope).unsqueeze(1)
            rows = rows * lower_slope.unsqueeze(1) + negative * slopes
            bias = bias + (negative.flatten(2) @ intercept.flatten(1).unsqueeze(2)).squeeze(2)
        elif isinstance(op, AddOp):
            _add(pending, sources[1], rows)
        else:
            assert isinstance(op, AffineOp)
            batch, count, in_shape = rows.shape[0], rows.shape[1], tuple(lower.shape[1:])
            flat = rows.reshape(batch * count, *rows.shape[2:])
            bias = bias + op.bias_term(flat).reshape(batch, count)
            rows = op.transpose(flat, in_shape).reshape(batch, count, *in_shape)
        _add(pending, sources[0], rows)
    pending[-1] = bias
    return start - 1


def _add(pending: dict[int, Tensor], node: int, rows: Tensor) -> None:
    pending[node] = rows if node not in pending else pending[node] + rows


def _finish(
    network: Network,
    pending: dict[int, Tensor],
    bias: Tensor,
    boxes: list[Box],
    inputs: InputSet,
    last: int,
    start: int = 0,
) -> Tensor:
    """The lower bounds of the rows ``pending`` plus ``bias`` after the walk down from op
    ``last``: minimised over the input set (``start == 0``) or over ``boxes[start]``."""
    _walk(network, pending, bias, boxes, last, start)
    bias = pending.pop(-1)
    rows = pending.pop(start)
    assert not pending, "rows left on nodes before the start"
    if start == 0:
        return inputs.concretize_lower(rows, bias)
    lower, upper = boxes[start]
    flat = rows.flatten(2)
    mid = ((upper + lower) / 2).flatten(1).unsqueeze(2)
    radius = ((upper - lower) / 2).flatten(1).unsqueeze(2)
    return (flat @ mid - flat.abs() @ radius).squeeze(2) + bias


def backward_lower(
    network: Network,
    a: Tensor,
    boxes: list[Box],
    inputs: InputSet,
    end: int,
    start: int = 0,
    bias: Tensor | None = None,
) -> Tensor:
    """Lower bounds of ``a . h + bias`` (``h``: node ``end``; ``a`` is ``(N or 1, S, *shape of
    h)``, ``bias`` 0 or ``(N or 1, S)``) by CROWN's backward pass through ops ``end - 1`` down to
    ``start``, minimised over the input set (``start == 0``) or over ``boxes[start]`` (which must
    then be the only way back: a chain); ``(N, S)``."""
    if bias is None:
        bias = a.new_zeros(a.shape[0], a.shape[1])
    return _finish(network, {end: a}, bias, boxes, inputs, end - 1, start)
