"""A classifier's penultimate features: the input of the last ``nn.Linear`` it calls.

The readout is found generically: one forward pass records the order in which the model calls
its ``nn.Linear`` modules, and the last one called reads the representation the defences use
(digits-cnn, mnist-small and the tabular MLP end in ``Linear``; PreAct-ResNet18's ``linear``
reads its pooled features). A forward pre-hook on that module then collects its input.

Two readers share it: the detectors (Lee et al. 2018 fit their Gaussians on the last hidden
layer; Metzen et al. 2017 attach a detector to a hidden layer), which need the logits and the
features of one pass with the gradient kept, and the training-set defences against poisoning
(Tran et al. 2018's spectral signatures, Chen et al. 2018's activation clustering), which need
the features of a whole split, batch by batch, without gradients.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

from ..data.lazy import Inputs
from ..errors import AdvtrainError
from ..util import evaluating


def readout_name(model: nn.Module, probe: Tensor) -> str:
    """The module name of the last ``nn.Linear`` ``model`` calls on ``probe`` (its readout)."""
    linear = {id(m): name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linear:
        raise AdvtrainError(
            "the model has no torch.nn.Linear layer, so the features before its readout cannot "
            "be read"
        )
    called: list[str] = []
    handles = [
        m.register_forward_hook(lambda mod, _i, _o: called.append(linear[id(mod)]))
        for m in model.modules()
        if id(m) in linear
    ]
    try:
        with evaluating(model):
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    if not called:
        raise AdvtrainError("the model ran none of its torch.nn.Linear layers in a forward pass")
    return called[-1]


def readout_layer(model: nn.Module, probe: Tensor) -> nn.Module:
    """The last ``nn.Linear`` module ``model`` calls on ``probe``."""
    return dict(model.named_modules())[readout_name(model, probe)]


def logits_and_features(model: nn.Module, readout: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """The logits of ``x`` and the (flattened) input of the module ``readout``, in one pass,
    in the model's current mode and with autograd as the caller has it. The hook keeps only the
    calling thread's pass, so a served model scores concurrent requests apart."""
    modules = dict(model.named_modules())
    if readout not in modules:
        raise AdvtrainError(f"the model has no module {readout!r} to read its features at")
    seen: list[Tensor] = []
    caller = threading.get_ident()  # a hook sees every thread's passes: keep this thread's only

    def keep(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if threading.get_ident() == caller:
            seen.append(inputs[0])

    handle = modules[readout].register_forward_pre_hook(keep)
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not seen:
        raise AdvtrainError(f"the model did not call its module {readout!r}")
    return logits, seen[-1].reshape(len(x), -1)


def penultimate_features(model: nn.Module, x: Inputs, batch_size: int = 512) -> Tensor:
    """The readout's input for every row of ``x`` (a tensor or lazily read inputs), ``(N, d)``
    float32 on the CPU, in eval mode without gradients (each module's mode restored after)."""
    if len(x) == 0:
        raise AdvtrainError("no inputs to take features of")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    readout = readout_name(model, x[:2].to(device))
    parts: list[Tensor] = []
    with evaluating(model):
        for i in range(0, len(x), batch_size):
            _, features = logits_and_features(model, readout, x[i : i + batch_size].to(device))
            parts.append(features.float().cpu())
    return torch.cat(parts)
