"""The classifier's penultimate features: the input of the last ``nn.Linear`` it calls.

Lee et al. (2018) fit their Gaussians on a network's hidden features, the last hidden layer
first; Metzen et al. (2017) attach their detector to a hidden layer. Both read the features here
through a forward pre-hook on the readout layer, in the same pass that gives the logits, with
the gradient to the input kept (an adaptive attack differentiates through them). The hook keeps
only the calling thread's pass, so a served model scores concurrent requests apart.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

from ..errors import AdvtrainError


def readout_name(model: nn.Module, probe: Tensor) -> str:
    """The module name of the last ``nn.Linear`` ``model`` calls on ``probe`` (its readout)."""
    linear = {id(m): name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linear:
        raise AdvtrainError(
            "the model has no torch.nn.Linear readout, so its penultimate features cannot be read "
            "(the mahalanobis and binary detectors need them; feature squeezing does not)"
        )
    called: list[str] = []
    handles = [
        m.register_forward_hook(lambda mod, _i, _o: called.append(linear[id(mod)]))
        for m in model.modules()
        if id(m) in linear
    ]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    if not called:
        raise AdvtrainError("the model called none of its torch.nn.Linear layers on a probe input")
    return called[-1]


def logits_and_features(model: nn.Module, readout: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """The logits of ``x`` and the (flattened) input of the module ``readout``, in one pass."""
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
