"""Networks people already have, by name: ``torchvision:NAME`` and ``timm:NAME``.

Both libraries are optional (``pip install 'advtrain[vision]'``) and imported only when such a
name is asked for. Every network is built with ``pretrained``/``weights`` off: advtrain never
downloads anything; trained weights come from a file (``--weights``, :mod:`advtrain.checkpoint`).

- torchvision (``torchvision.models.get_model(name, weights=None, num_classes=K)``): the
  architectures take 3 channels; for ``C != 3`` the first ``Conv2d`` with 3 input channels (the
  stem: ``conv1`` of a ResNet, ``features[0]`` of a VGG, ``conv_proj`` of a ViT) is replaced by
  one with ``C`` inputs, freshly initialised, as timm's ``in_chans`` does. Weights trained on
  3 channels then do not fit, and loading them says which tensor differs. Models that take an
  image size (``vit_*``) are built for square inputs of the input's size.
- timm (``timm.create_model(name, pretrained=False, num_classes=K, in_chans=C)``): models that
  take an image size (ViT, Swin, ...) are built for the input's ``H×W``.

The network is wrapped in :func:`~advtrain.models.adapters.logits_model`, so a tuple output
(torchvision's GoogLeNet and Inception v3 in training mode), a dict's ``"logits"`` or an
object's ``.logits`` reach the attacks as a logits tensor. The built model is run once on a
zero input of the asked shape, so an architecture that cannot take that input is a one-line
error before any work.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..errors import AdvtrainError, UnknownNameError
from ..util import one_line
from ._shapes import expect_rank
from .adapters import extract_logits, logits_model

#: The name prefixes this module builds, with the module each one needs.
LIBRARIES: dict[str, str] = {"torchvision": "torchvision.models", "timm": "timm"}
EXTRA = "pip install 'advtrain[vision]'"
CLOSE_NAMES = 4  # close names listed with an unknown architecture


def is_hub_name(name: object) -> bool:
    """Whether ``name`` is ``torchvision:NAME`` or ``timm:NAME``."""
    return isinstance(name, str) and name.split(":", 1)[0] in LIBRARIES and ":" in name


def build_hub_model(name: str, in_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """A freshly initialised ``torchvision:NAME`` or ``timm:NAME`` network for ``(C, H, W)``
    inputs and ``n_classes`` logits, wrapped to return logits (see the module docstring)."""
    library, _, arch = name.partition(":")
    channels, height, width = expect_rank(name, in_shape, 3, "(C, H, W)")
    module = import_library(library, name)
    build = _torchvision if library == "torchvision" else _timm
    net = build(module, arch, name, (channels, height, width), n_classes)
    model = logits_model(net)
    _probe(model, name, (channels, height, width), n_classes)
    return model


def import_library(library: str, name: str) -> ModuleType:
    """The library's module, or a one-line error saying how to install it."""
    try:
        return importlib.import_module(LIBRARIES[library])
    except ImportError:
        raise AdvtrainError(
            f"--model {name} needs {library}, which is not installed: {EXTRA}"
        ) from None
    except Exception as exc:  # a wheel built for another torch fails with RuntimeError/OSError
        raise AdvtrainError(
            f"--model {name}: {library} is installed but does not import beside torch "
            f"{torch.__version__} ({one_line(exc, 120)}); install the {library} release built "
            "for this torch"
        ) from None


def unknown_architecture(library: str, arch: str, known: Iterable[str]) -> UnknownNameError:
    """The error for an architecture ``library`` does not have, with a few close names."""
    close = difflib.get_close_matches(arch, list(known), n=CLOSE_NAMES, cutoff=0.5)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return UnknownNameError(f"{library} has no model {arch!r}{hint}")


def _torchvision(
    module: ModuleType, arch: str, name: str, shape: tuple[int, int, int], n_classes: int
) -> nn.Module:
    known = module.list_models()
    if arch not in known:
        raise unknown_architecture("torchvision", arch, known)
    options: dict[str, Any] = {"weights": None, "num_classes": n_classes}
    if arch in ("googlenet", "inception_v3"):
        options["init_weights"] = True  # their own default, said to silence a FutureWarning
    net = None
    if shape[1] == shape[2]:  # a ViT is built for one square size
        try:
            net = _call(module.get_model, name, arch, image_size=shape[1], **options)
        except AdvtrainError as exc:
            if "image_size" not in str(exc):  # a CNN takes any size and no image_size
                raise
    if net is None:
        net = _call(module.get_model, name, arch, **options)
    if shape[0] != 3:
        _replace_stem(net, shape[0], name)
    return net


def _replace_stem(net: nn.Module, channels: int, name: str) -> None:
    """Replace the first 3-channel ``Conv2d`` by one with ``channels`` inputs."""
    for parent in net.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                stem = nn.Conv2d(
                    channels,
                    child.out_channels,
                    child.kernel_size,  # type: ignore[arg-type]  # a tuple of ints
                    stride=child.stride,  # type: ignore[arg-type]
                    padding=child.padding,  # type: ignore[arg-type]
                    dilation=child.dilation,  # type: ignore[arg-type]
                    groups=1,
                    bias=child.bias is not None,
                    padding_mode=child.padding_mode,
                )
                setattr(parent, child_name, stem)
                return
    raise AdvtrainError(
        f"--model {name} takes 3 channels and has no 3-channel Conv2d to adapt to {channels}: "
        "give RGB images"
    )


def _timm(
    module: ModuleType, arch: str, name: str, shape: tuple[int, int, int], n_classes: int
) -> nn.Module:
    if not module.is_model(arch):
        raise unknown_architecture("timm", arch, module.list_models())
    options: dict[str, Any] = {"pretrained": False, "num_classes": n_classes, "in_chans": shape[0]}
    try:
        return _call(module.create_model, name, arch, img_size=shape[1:], **options)
    except AdvtrainError as exc:
        if "img_size" not in str(exc):  # a CNN takes any size and no img_size
            raise
    return _call(module.create_model, name, arch, **options)


def _call(factory: Callable[..., Any], name: str, arch: str, **options: Any) -> nn.Module:
    """``factory(arch, **options)`` with its errors as one line naming the model."""
    try:
        net = factory(arch, **options)
    except AdvtrainError:
        raise
    except Exception as exc:  # the libraries raise ValueError, TypeError, AssertionError, ...
        raise AdvtrainError(f"--model {name}: {one_line(exc, 160)}") from None
    if not isinstance(net, nn.Module):
        raise AdvtrainError(f"--model {name} built a {type(net).__name__}, not a torch module")
    return net


def _probe(model: nn.Module, name: str, shape: tuple[int, int, int], n_classes: int) -> None:
    """Run ``model`` in eval mode on one zero input: it must give ``n_classes`` logits."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = extract_logits(model(torch.zeros(1, *shape)))
    except AdvtrainError:
        raise
    except Exception as exc:  # too small an input for the architecture, mostly
        raise AdvtrainError(
            f"--model {name} cannot take inputs of shape {shape}: {one_line(exc, 160)}"
        ) from None
    finally:
        model.train(training)
    if tuple(out.shape) != (1, n_classes):
        raise AdvtrainError(
            f"--model {name} gives outputs of shape {tuple(out.shape[1:])}, not {n_classes} logits"
        )
