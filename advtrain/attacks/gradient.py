"""The input gradient every white-box attack takes, zero where the output does not depend on it.

A model may cut its output off from autograd's graph of the input: a preprocessing step done in
NumPy or PIL, an ``x.detach()``, an output built from ``argmax`` (hard labels, one-hot vectors).
``torch.autograd.grad`` then raises, and an evaluation that crashes on such a model reports nothing
at all, when it should report the masking and attack it without gradients. Here the gradient of a
disconnected output is zero, as it is for a step function: the attacks go on, the "zero or NaN
gradients" diagnostic fires, and the evaluation escalates to gradient-free attacks (Athalye,
Carlini & Wagner 2018, "Obfuscated gradients give a false sense of security", sec. 3).
"""

from __future__ import annotations

import torch
from torch import Tensor


def input_gradient(
    output: Tensor,
    inputs: Tensor,
    grad_output: Tensor | None = None,
    *,
    retain_graph: bool | None = None,
    batched: bool = False,
) -> Tensor:
    """``d output / d inputs`` (weighted by ``grad_output``), zeros where ``output`` is not
    connected to ``inputs`` in autograd's graph.

    ``batched``: ``grad_output`` holds a leading batch of weightings, one gradient each
    (``torch.autograd.grad(..., is_grads_batched=True)``); the result then has that leading
    dimension too.
    """
    if output.requires_grad:
        (grad,) = torch.autograd.grad(
            output,
            inputs,
            grad_output,
            retain_graph=retain_graph,
            allow_unused=True,
            is_grads_batched=batched,
        )
        if grad is not None:
            return grad
    shape = (
        inputs.shape if not batched or grad_output is None else (len(grad_output), *inputs.shape)
    )
    return torch.zeros(shape, dtype=inputs.dtype, device=inputs.device)
