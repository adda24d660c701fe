"""A faster input gradient for the first convolution of image models, on the CPU only.

Attacks need the gradient of the loss with respect to the *input* only (the model is frozen).
For a convolution with few input channels (the first layer of an image model: 1 channel for
MNIST, 3 for colour) the CPU backend's backward-data kernel is much slower than its forward pass.
The same gradient is one matrix product followed by a strided add per kernel tap (col2im); the
adds replace ``F.fold``, whose CPU kernel loops over the samples. (``bench/pgd_speed.py``
measures the gain.)

:func:`fast_input_gradients` is a context manager that routes such convolutions through
:class:`_ConvInputGrad`: the forward is ``conv2d`` itself, bit for bit; only the backward
differs, and only by float rounding. It applies when the input needs a gradient and the weights
and bias do not, on the CPU, for ``groups == 1``, ``dilation == 1``, numeric padding and at most
:data:`MAX_CHANNELS` input channels; every other call runs untouched.

It is a speed-up strategy chosen by device: :func:`input_gradient_speedup` (entered by
:func:`~advtrain.attacks.base.frozen`) installs it for a model on the CPU and nothing elsewhere,
so on an accelerator no torch call goes through its Python dispatch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

#: Convolutions with at most this many input channels take the matmul + per-tap add backward.
MAX_CHANNELS = 4


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        return int(value[0]), int(value[1])
    return None


class _ConvInputGrad(torch.autograd.Function):
    """``conv2d`` whose backward gives the input gradient by ``W^T @ grad`` and one strided
    add per kernel tap."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
    ) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.geometry = (tuple(x.shape[2:]), stride, padding)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        size, stride, padding = ctx.geometry
        n, channels_out, h, w = grad_out.shape
        channels_in, kh, kw = weight.shape[1:]
        columns = torch.matmul(
            weight.reshape(channels_out, -1).t(), grad_out.reshape(n, channels_out, h * w)
        )
        return (
            _scatter_taps(columns.reshape(n, channels_in, kh, kw, h, w), size, stride, padding),
            None,
            None,
            None,
            None,
        )


def _scatter_taps(
    columns: Tensor, size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> Tensor:
    """``fold`` (col2im) of ``columns`` (n, C, kh, kw, h, w) onto (n, C, *size): each kernel
    tap's (n, C, h, w) block added at its strided place in the padded plane. The same sums as
    ``F.fold``, whose CPU kernel loops over the samples and is about twice as slow here."""
    n, channels, kh, kw, h, w = columns.shape
    (sh, sw), (ph, pw) = stride, padding
    plane = columns.new_zeros(
        n,
        channels,
        max(size[0] + 2 * ph, (h - 1) * sh + kh),
        max(size[1] + 2 * pw, (w - 1) * sw + kw),
    )
    for ky in range(kh):
        for kx in range(kw):
            plane[:, :, ky : ky + sh * (h - 1) + 1 : sh, kx : kx + sw * (w - 1) + 1 : sw] += (
                columns[:, :, ky, kx]
            )
    return plane[:, :, ph : ph + size[0], pw : pw + size[1]].contiguous()


class _FastInputGradMode(TorchFunctionMode):
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.conv2d or func is torch.conv2d:
            routed = _route(*args, **kwargs)
            if routed is not None:
                return routed
        return func(*args, **kwargs)


def _route(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Tensor | None:
    """The convolution through :class:`_ConvInputGrad`, or None when it does not apply."""
    stride2, padding2, dilation2 = _pair(stride), _pair(padding), _pair(dilation)
    if (
        not isinstance(x, Tensor)
        or x.dim() != 4
        or x.device.type != "cpu"
        or not (torch.is_grad_enabled() and x.requires_grad)
        or weight.requires_grad
        or (bias is not None and bias.requires_grad)
        or groups != 1
        or stride2 is None
        or padding2 is None
        or dilation2 != (1, 1)
        or x.shape[1] > MAX_CHANNELS
        or x.dtype not in (torch.float32, torch.float64)
    ):
        return None
    return _ConvInputGrad.apply(x, weight, bias, stride2, padding2)


@contextlib.contextmanager
def fast_input_gradients() -> Iterator[None]:
    """Within the block, eligible CPU convolutions take the faster input-gradient backward.

    Re-entering it (nested attacks) adds nothing: the mode is pushed once."""
    if any(isinstance(mode, _FastInputGradMode) for mode in _mode_stack()):
        yield
        return
    with _FastInputGradMode():
        yield


#: The input-gradient speed-up of each device type; devices not listed get none.
SPEEDUPS: dict[str, Callable[[], AbstractContextManager[None]]] = {"cpu": fast_input_gradients}


def input_gradient_speedup(device: torch.device) -> AbstractContextManager[None]:
    """The context in which attacks on ``device`` take input gradients: :func:`fast_input_gradients`
    on the CPU; elsewhere nothing at all (no torch-function mode to dispatch through)."""
    speedup = SPEEDUPS.get(device.type)
    return contextlib.nullcontext() if speedup is None else speedup()


def _mode_stack() -> list[Any]:
    """The torch-function modes in force (innermost last); empty where torch cannot say."""
    try:
        from torch.overrides import _get_current_function_mode_stack
    except ImportError:  # a torch without the (private) accessor: nesting then pushes again
        return []
    return list(_get_current_function_mode_stack())


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Within the block, the fast input-gradient mode (if it is the innermost mode) is off.

    For attacks that never take gradients (score- and decision-based ones): every torch call
    they make would otherwise pass through the mode's Python dispatch for nothing.
    """
    stack = _mode_stack()
    if stack and isinstance(stack[-1], _FastInputGradMode):
        from torch.overrides import _pop_mode_temporarily

        with _pop_mode_temporarily():
            yield
    else:
        yield
