"""Where and how a run computes: device, process group, mixed precision, memory format,
compilation, and the optimizer.

:func:`make_runtime` puts the model on this process's device (``cuda:<local rank>`` under
torchrun), joins the process group, chooses the autocast dtype (``amp``: bf16 where the GPU has
it, else fp16 with a gradient scaler; off on the CPU), converts images to channels-last on CUDA,
synchronises BatchNorm over the ranks when asked, and compiles the model the training loss calls
(``torch.compile`` with the configured backend; it shares the plain model's weights).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..data.base import DatasetInfo
from ..errors import AdvtrainError
from ..util import resolve_device
from .config import TrainConfig


@dataclass
class Runtime:
    """The computing set-up of one training process.

    ``model`` is the network on the device (the weights that are saved); ``train_model`` is
    what the training loss calls (``model`` itself, or its compiled form). ``scaler`` is the
    fp16 gradient scaler (``None`` otherwise).
    """

    device: torch.device
    rank: int
    world: int
    amp_dtype: torch.dtype | None
    channels_last: bool
    sync_batchnorm: bool
    model: nn.Module
    train_model: nn.Module
    scaler: Any

    @property
    def pin_memory(self) -> bool:
        """Pinned host memory lets each batch's copy to the GPU run without blocking the host."""
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The mixed-precision context of the training forward passes (none without AMP)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def make_runtime(model: nn.Module, config: TrainConfig, info: DatasetInfo) -> Runtime:
    """Set up this process for ``config`` and move ``model`` there (see the module docstring)."""
    device = distributed.rank_device(resolve_device(config.device))
    rank, world = distributed.init_from_env(device.type)
    amp_dtype = amp_dtype_for(config.amp, device)
    channels_last = use_channels_last(config.channels_last, device, info)
    model = model.to(device)
    if channels_last:
        # torch's stubs lack Module.to(memory_format=...)
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    sync_batchnorm = config.sync_batchnorm and world > 1
    if sync_batchnorm:
        model = distributed.synchronise_batchnorm(model, device)
    train_model = model if config.compile == "off" else torch.compile(model, backend=config.compile)
    return Runtime(
        device=device,
        rank=rank,
        world=world,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        sync_batchnorm=sync_batchnorm,
        model=model,
        train_model=train_model,  # type: ignore[arg-type]  # torch.compile's stub returns a callable
        scaler=_grad_scaler() if amp_dtype == torch.float16 else None,
    )


def amp_dtype_for(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` mode ``mode`` on ``device`` (``None``: full precision)."""
    if mode == "off":
        return None
    if device.type != "cuda":
        if mode == "auto":
            return None
        raise AdvtrainError(
            f"amp {mode!r} needs a CUDA device; this run's device is {device} "
            '(use amp = "auto" or "off")'
        )
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def use_channels_last(mode: str, device: torch.device, info: DatasetInfo) -> bool:
    """Whether ``channels_last`` mode ``mode`` converts this run (images only)."""
    images = len(info.shape) == 3
    if mode == "auto":
        return device.type == "cuda" and images
    if mode == "on" and not images:
        raise AdvtrainError(
            f"channels_last is for images (C, H, W); dataset {info.name!r} has "
            f"inputs of shape {tuple(info.shape)}"
        )
    return mode == "on"


def _grad_scaler() -> Any:
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()  # pragma: no cover - torch < 2.3


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or Adam over the trainable parameters, as configured."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
