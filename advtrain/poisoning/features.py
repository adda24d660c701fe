"""The penultimate layer's activations, which the training-set defences cluster and project.

Found generically: one forward pass records the order in which the model calls its
``nn.Linear`` modules, and the input of the last one called is the representation the
classifier's head reads (digits-cnn, mnist-small and the tabular MLP end in ``Linear``;
PreAct-ResNet18's ``linear`` reads its pooled features). A forward pre-hook on that module then
collects its inputs, flattened, batch by batch, in eval mode (restored afterwards).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..attacks import frozen
from ..attacks.base import model_device
from ..data.lazy import Inputs
from ..errors import AdvtrainError


def head_layer(model: nn.Module, sample: Tensor) -> nn.Linear:
    """The last ``nn.Linear`` that ``model`` calls on ``sample`` (a batch)."""
    called: list[nn.Linear] = []

    def record(module: nn.Module, args: Any) -> None:
        called.append(module)  # type: ignore[arg-type]

    hooks = [
        m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.Linear)
    ]
    if not hooks:
        raise AdvtrainError(
            f"{type(model).__name__} has no nn.Linear head: the penultimate layer's features "
            "(spectral signatures, activation clustering) need one"
        )
    try:
        with frozen(model), torch.no_grad():
            model(sample)
    finally:
        for hook in hooks:
            hook.remove()
    if not called:
        raise AdvtrainError(f"{type(model).__name__} never called its nn.Linear layers")
    return called[-1]


def penultimate_features(model: nn.Module, x: Inputs, batch_size: int = 512) -> Tensor:
    """The input of the model's last ``nn.Linear`` for every row of ``x``, ``(N, d)`` float32
    on the CPU."""
    if len(x) == 0:
        raise AdvtrainError("no inputs to take features of")
    device = model_device(model, default=torch.device("cpu"))
    head = head_layer(model, x[:2].to(device))
    parts: list[Tensor] = []

    def keep(module: nn.Module, args: Any) -> None:
        parts.append(args[0].detach().flatten(1).float().cpu())

    hook = head.register_forward_pre_hook(keep)
    try:
        with frozen(model), torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(x[i : i + batch_size].to(device))
    finally:
        hook.remove()
    return torch.cat(parts)
