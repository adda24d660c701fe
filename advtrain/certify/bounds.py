"""Proven bounds on a network's outputs over a threat model: IBP, CROWN-IBP and CROWN.

A point ``(x, y)`` is **verified** when the lower bound of every margin ``z_y - z_c`` (``c != y``)
over the whole threat model is positive: no input the adversary may choose changes the
prediction. The bounds come from

- ``"ibp"``: interval bound propagation (Gowal et al. 2018), the margin matrix folded into the
  last affine layers as in their paper;
- ``"crown-ibp"``: CROWN's backward relaxation of the margins over IBP's intermediate bounds
  (Zhang et al., ICLR 2020);
- ``"crown"``: full CROWN (Zhang et al., NeurIPS 2018), every ReLU's input bounded by CROWN
  itself, layer after layer.

The CROWN variants return the better of their bound and IBP's for each margin (both are sound),
so they are never looser than ``"ibp"``; for a network trained with IBP, IBP's bound can be the
tighter one. CROWN's cost grows with the units left unstable; IBP costs about two forward passes.

Networks: (nested) ``nn.Sequential`` of ``Linear``, ``Conv2d``, ``ReLU``, ``Flatten``,
``BatchNorm1d/2d`` and ``Dropout`` in eval mode, ``AvgPool2d``, ``AdaptiveAvgPool2d(1)``,
``Identity`` and advtrain's ``Normalize`` (:mod:`advtrain.certify.operations`), and models with
their own ``forward`` built from these, ReLU calls and residual additions, read by ``torch.fx``
(:mod:`advtrain.certify.network`); threat models: ``linf`` and ``l2`` balls inside
the input box, with a mask of fixed features (:mod:`advtrain.certify.input_set`). Anything else
is refused by a one-line error before any work.

The functions here keep autograd on (certified training backpropagates through the bounds);
:func:`verify` runs without it, in batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..threat import ThreatModel
from ..util import check_positive_int
from .crown import Box, backward_lower, interval_trace
from .input_set import InputSet
from .network import parse
from .operations import Network

__all__ = [
    "BOUND_METHODS",
    "Verification",
    "interval_bounds",
    "margin_lower_bounds",
    "margin_spec",
    "training_margins",
    "verify",
]

BOUND_METHODS = ("ibp", "crown-ibp", "crown")

#: Default :func:`verify` batch sizes: full CROWN holds rows over every unstable unit.
DEFAULT_BATCH = {"ibp": 1000, "crown-ibp": 500, "crown": 32}


@dataclass(frozen=True)
class Verification:
    """The outcome of :func:`verify`: ``verified`` (``(N,)`` bool: every margin's lower bound is
    > 0), ``margins`` (``(N, C)`` lower bounds of ``z_y - z_c``; the ``y`` column is 0) and the
    bound ``method``."""

    verified: Tensor
    margins: Tensor
    method: str

    @property
    def accuracy(self) -> float:
        """The share of verified points (verified accuracy, a lower bound on robust accuracy)."""
        return float(self.verified.float().mean()) if len(self.verified) else 0.0


def interval_bounds(model: nn.Module, x: Tensor, threat: ThreatModel) -> tuple[Tensor, Tensor]:
    """IBP bounds ``(lower, upper)`` on the model's outputs over the threat model around ``x``."""
    network, inputs = parse(model), InputSet.build(threat, x)
    return interval_trace(network, inputs)[-1]


def margin_spec(y: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """The margin matrix ``(N, C - 1, C)`` (rows ``e_y - e_c`` for every ``c != y``) and the
    classes ``c`` of its rows ``(N, C - 1)``."""
    classes = torch.arange(n_classes, device=y.device)
    others = classes.expand(len(y), n_classes)[classes.unsqueeze(0) != y.unsqueeze(1)]
    others = others.reshape(len(y), n_classes - 1)
    eye = torch.eye(n_classes, device=y.device)
    return eye[y].unsqueeze(1) - eye[others], others


def margin_lower_bounds(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, method: str = "crown"
) -> Tensor:
    """Lower bounds ``(N, C)`` of ``z_y - z_c`` over the threat model around ``x``, by
    ``method`` (``"ibp"``, ``"crown-ibp"`` or ``"crown"``); the ``y`` column is 0 (the margin of
    ``y`` to itself)."""
    _check_method(method)
    network, inputs = parse(model), InputSet.build(threat, x)
    return _margins(network, inputs, y, method)


def training_margins(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, crown: bool
) -> tuple[Tensor, Tensor | None]:
    """IBP's margin lower bounds and, when ``crown``, CROWN-IBP's (``None`` otherwise), both
    ``(N, C)`` with a 0 ``y`` column, from one IBP pass: what IBP and CROWN-IBP training need.
    Unlike :func:`margin_lower_bounds`, CROWN-IBP's bound is returned as it is (not the better
    of it and IBP's), as the training objective of Zhang et al. (2020) mixes the two."""
    network, inputs = parse(model), InputSet.build(threat, x)
    spec, others = _spec(network, inputs, y)
    boxes = interval_trace(network, inputs)
    ibp = _scatter(_ibp_bound(network, spec, boxes, inputs), others)
    if not crown:
        return ibp, None
    found = backward_lower(network, spec, boxes, inputs, len(network))
    return ibp, _scatter(found, others)


def verify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    method: str = "crown",
    batch_size: int | None = None,
) -> Verification:
    """Which points are verified over the threat model by ``method``, without autograd.

    The bounds run as a cascade up to ``method``: IBP on every point, then CROWN-IBP on the
    points still unverified that the model classifies correctly, then full CROWN on the points
    still left (a point verified by a cheaper sound bound is verified; a misclassified point
    never is). ``margins`` hold, per point, the best lower bounds computed. Each stage runs in
    batches of ``batch_size`` (default per stage: :data:`DEFAULT_BATCH`)."""
    _check_method(method)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    network = parse(model)
    if len(x) != len(y):
        raise AdvtrainError(f"verify got {len(x)} inputs and {len(y)} labels")
    stages = BOUND_METHODS[: BOUND_METHODS.index(method) + 1]
    if len(x) == 0:
        return Verification(torch.zeros(0, dtype=torch.bool), x.new_zeros(0, 0), method)
    with torch.no_grad():
        margins = _batched(network, x, y, threat, stages[0], batch_size)
        if len(stages) > 1:
            correct = _batched_predictions(network, x, DEFAULT_BATCH["ibp"]) == y.to(x.device)
        for stage in stages[1:]:
            left = (correct & ~_verified(margins, y)).nonzero().squeeze(1)
            if len(left) == 0:
                break
            found = _batched(network, x[left], y[left], threat, stage, batch_size)
            margins[left] = torch.maximum(margins[left], found)
    return Verification(verified=_verified(margins, y), margins=margins, method=method)


def _verified(margins: Tensor, y: Tensor) -> Tensor:
    """Rows whose every margin but ``y``'s own is positive."""
    if len(y) == 0:
        return torch.zeros(0, dtype=torch.bool, device=margins.device)
    labels = y.reshape(-1, 1).to(margins.device)
    return (margins > 0).scatter(1, labels, True).all(1)


def _batched(
    network: Network, x: Tensor, y: Tensor, threat: ThreatModel, method: str, size: int | None
) -> Tensor:
    size = DEFAULT_BATCH[method] if size is None else size
    chunks = [
        _margins(network, InputSet.build(threat, x[i : i + size]), y[i : i + size], method)
        for i in range(0, len(x), size)
    ]
    return torch.cat(chunks) if chunks else x.new_zeros(0, 0)


def _batched_predictions(network: Network, x: Tensor, size: int) -> Tensor:
    return torch.cat([network.forward(x[i : i + size]).argmax(1) for i in range(0, len(x), size)])


# ---------------------------------------------------------------------- internals


def _check_method(method: str) -> None:
    if method not in BOUND_METHODS:
        raise AdvtrainError(
            f"unknown bound method {method!r}; choose one of: {', '.join(BOUND_METHODS)}"
        )


def _spec(network: Network, inputs: InputSet, y: Tensor) -> tuple[Tensor, Tensor]:
    """The margin matrix for ``y`` (its class count read from the network's output)."""
    with torch.no_grad():
        output = network.forward(inputs.centre[:1])
    if output.dim() != 2 or output.shape[1] < 2:
        raise AdvtrainError(
            f"margins need a model that returns (N, classes) logits with >= 2 classes, got "
            f"outputs of shape {tuple(output.shape)}"
        )
    n_classes = output.shape[1]
    if y.dim() != 1 or len(y) != len(inputs.centre):
        raise AdvtrainError(
            f"labels must be a vector of {len(inputs.centre)} class indices, got shape "
            f"{tuple(y.shape)}"
        )
    y = y.to(inputs.centre.device)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise AdvtrainError(f"labels must lie in [0, {n_classes}), got {y.min()}..{y.max()}")
    spec, others = margin_spec(y, n_classes)
    return spec.to(inputs.centre.dtype), others


def _ibp_bound(network: Network, spec: Tensor, boxes: list[Box], inputs: InputSet) -> Tensor:
    """IBP's margin bound: the margin rows taken through the last affine layers, then minimised
    over the box IBP gives for their input (Gowal et al.'s elision of the last layer)."""
    return backward_lower(network, spec, boxes, inputs, len(network), network.tail_start())


def _scatter(bound: Tensor, others: Tensor) -> Tensor:
    """``(N, C - 1)`` bounds on the rows ``others`` as ``(N, C)`` with a 0 ``y`` column."""
    full = bound.new_zeros(len(bound), others.shape[1] + 1)
    return full.scatter(1, others, bound)


def _margins(network: Network, inputs: InputSet, y: Tensor, method: str) -> Tensor:
    spec, others = _spec(network, inputs, y)
    boxes = interval_trace(network, inputs)
    bound = _ibp_bound(network, spec, boxes, inputs)
    if method != "ibp":
        if method == "crown":
            boxes = interval_trace(network, inputs, tighten=True)
        bound = torch.maximum(bound, backward_lower(network, spec, boxes, inputs, len(network)))
    return _scatter(bound, others)
