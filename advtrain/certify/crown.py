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
from .network import AffineOp, AvgPoolOp, Conv2dOp, FlattenOp, LinearOp, Network, ReLUOp

__all__ = ["Box", "backward_lower", "interval_trace"]

Box = tuple[Tensor, Tensor]

#: At most this many floats in one tensor of rows ``a`` while tightening (chunks of units).
ROW_BUDGET = 1 << 25


def interval_trace(network: Network, inputs: InputSet, tighten: bool = False) -> list[Box]:
    """The box at the input of every operation, and at the output last (``len(network) + 1``
    boxes). IBP, except that with an l2 ball the first Linear/Conv2d (after flattening only)
    also bounds each unit over the ball, ``w x + b +- eps ||w * mask||_2``, keeping the better
    side of each bound; with ``tighten`` the input of every ReLU is tightened by CROWN (full
    CROWN's intermediate bounds) unless the box is already each unit's exact range (one
    feature-mixing layer from the input: CROWN would give the same)."""
    boxes: list[Box] = [(inputs.lower, inputs.upper)]
    ops = network.ops
    leading = True  # only flattening so far: the l2 ball is still a ball of the same radius
    exact, mixed = True, False  # every unit's box is its exact range; a mixing layer passed
    for index, op in enumerate(ops):
        lower, upper = boxes[index]
        if isinstance(op, ReLUOp):
            boxes.append((lower.clamp_min(0), upper.clamp_min(0)))
            leading = exact = False
            continue
        assert isinstance(op, AffineOp)
        lower, upper = op.interval(lower, upper)
        ball = leading and inputs.norm == "l2" and isinstance(op, (LinearOp, Conv2dOp))
        if ball:
            lower, upper = _ball_bounds(network, index, inputs, lower, upper)
        if isinstance(op, (LinearOp, Conv2dOp, AvgPoolOp)):
            exact = exact and not mixed and (inputs.norm == "linf" or ball)
            mixed = True
        leading = leading and isinstance(op, FlattenOp)
        next_relu = index + 1 < len(ops) and isinstance(ops[index + 1], ReLUOp)
        if tighten and next_relu and not exact:
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
    network: Network, end: int, boxes: list[Box], inputs: InputSet, lower: Tensor, upper: Tensor
) -> Box:
    """``[lower, upper]`` (the input of the ReLU at ``end``) tightened by CROWN, for each sample
    on the units unstable there.

    The rows of those units go back through the affine layers since the previous ReLU once for
    the batch (over the units unstable in any sample); each sample then takes its own rows on
    through the rest of the network, in chunks that keep the rows within :data:`ROW_BUDGET`."""
    flat_lower, flat_upper = lower.flatten(1), upper.flatten(1)
    unstable = (flat_lower < 0) & (flat_upper > 0)
    union = unstable.any(0).nonzero().squeeze(1)
    if union.numel() == 0:
        return lower, upper
    relu = max((i for i in range(end) if isinstance(network.ops[i], ReLUOp)), default=-1)
    eye = torch.zeros(len(union), flat_lower.shape[1], dtype=lower.dtype, device=lower.device)
    eye[torch.arange(len(union), device=eye.device), union] = 1
    rows, bias = _walk(
        network, eye.reshape(1, len(union), *lower.shape[1:]), eye.new_zeros(1, len(union)),
        boxes, end, relu + 1,
    )  # fmt: skip
    if relu < 0:  # affine layers only: the rows are the same for every sample
        found_lower = inputs.concretize_lower(rows, bias)
        found_upper = -inputs.concretize_lower(-rows, -bias)
        flat_lower = flat_lower.index_copy(
            1, union, torch.maximum(flat_lower.index_select(1, union), found_lower)
        )
        flat_upper = flat_upper.index_copy(
            1, union, torch.minimum(flat_upper.index_select(1, union), found_upper)
        )
        return flat_lower.reshape(lower.shape), flat_upper.reshape(upper.shape)
    # each sample's unstable units, as positions in the union (padded with invalid ones)
    in_union = unstable.index_select(1, union)
    counts = in_union.sum(1)
    width = int(counts.max())
    positions = torch.argsort((~in_union).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=counts.device) < counts.unsqueeze(1)
    widest = max(math.prod(box[0].shape[1:]) for box in boxes[: relu + 1])
    per_chunk = max(1, ROW_BUDGET // (2 * len(flat_lower) * widest))
    for first in range(0, width, per_chunk):
        where, ok = positions[:, first : first + per_chunk], valid[:, first : first + per_chunk]
        part = rows[0][where] * ok.reshape(*ok.shape, *(1,) * (rows.dim() - 2))
        part_bias = bias[0][where] * ok
        count = where.shape[1]
        found = backward_lower(
            network, torch.cat([part, -part], 1), boxes, inputs, relu + 1,
            bias=torch.cat([part_bias, -part_bias], 1),
        )  # fmt: skip
        units = union[where]
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
    network: Network, rows: Tensor, bias: Tensor, boxes: list[Box], end: int, start: int
) -> tuple[Tensor, Tensor]:
    """Rows over the output of op ``end - 1`` and their constants taken back to the input of op
    ``start`` (CROWN's lines at the ReLUs, for a lower bound)."""
    for index in range(end - 1, start - 1, -1):
        op = network.ops[index]
        lower, upper = boxes[index]
        if isinstance(op, ReLUOp):
            lower_slope, upper_slope, intercept = relaxation(lower, upper)
            negative = rows.clamp_max(0)  # these go through the upper line
            rows = rows * lower_slope.unsqueeze(1) + negative * (
                upper_slope - lower_slope
            ).unsqueeze(1)
            bias = bias + (negative.flatten(2) @ intercept.flatten(1).unsqueeze(2)).squeeze(2)
            continue
        assert isinstance(op, AffineOp)
        batch, count, in_shape = rows.shape[0], rows.shape[1], tuple(lower.shape[1:])
        flat = rows.reshape(batch * count, *rows.shape[2:])
        bias = bias + op.bias_term(flat).reshape(batch, count)
        rows = op.transpose(flat, in_shape).reshape(batch, count, *in_shape)
    return rows, bias


def backward_lower(
    network: Network,
    a: Tensor,
    boxes: list[Box],
    inputs: InputSet,
    end: int,
    start: int = 0,
    bias: Tensor | None = None,
) -> Tensor:
    """Lower bounds of ``a . h_end + bias`` (``h_end``: the output of op ``end - 1``; ``a`` is
    ``(N or 1, S, *shape of h_end)``, ``bias`` 0 or ``(N or 1, S)``) by CROWN's backward pass
    through ops ``end - 1`` down to ``start``, minimised over the input set (``start == 0``) or
    over ``boxes[start]``; ``(N, S)``."""
    if bias is None:
        bias = a.new_zeros(a.shape[0], a.shape[1])
    rows, bias = _walk(network, a, bias, boxes, end, start)
    if start == 0:
        return inputs.concretize_lower(rows, bias)
    lower, upper = boxes[start]
    flat = rows.flatten(2)
    mid = ((upper + lower) / 2).flatten(1).unsqueeze(2)
    radius = ((upper - lower) / 2).flatten(1).unsqueeze(2)
    return (flat @ mid - flat.abs() @ radius).squeeze(2) + bias
