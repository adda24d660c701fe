"""Forward passes of inputs that differ from known ones inside one small window.

A score-based attack such as Square changes a few pixels per query, in one square window (at the
same place in every point of the batch). In a convolutional network only a patch of each feature
map depends on that window: a convolution or pooling layer with kernel ``k`` and stride ``s``
turns a changed band of ``R`` rows into at most ``(R + k - 2) // s + 1`` changed output rows.
:class:`WindowForward` keeps the feature maps of the current points and recomputes only those
patches, layer by layer, from slices of the layer's input.

The patches are recomputed from the input, so they equal the full pass's to the bit. Where the
head starts with ``Flatten`` and ``Linear`` (most CNN classifiers), that layer's output is also
kept and moved by the change of the last patch alone, ``z + W[:, patch] @ (new - old)``; the
rest of the head runs on it. That sum is rounded differently from the full product (about 1e-7
relative), so it is recomputed whole every :data:`REANCHOR` commits and nothing drifts. Other
heads run whole on the last map. Callers that act on a decision (an adversarial point) confirm it
with the model itself.

It applies to an ``nn.Sequential`` (nested ones flattened) of exactly these types, in eval mode,
with no hooks: first ``Conv2d`` (zero padding, numeric) or ``MaxPool2d`` (no ``ceil_mode``), each
followed by any number of pointwise layers (ReLU and the other elementwise activations, eval-mode
``BatchNorm2d`` with running statistics, ``Dropout`` in eval mode, ``Identity``), then any head.
:meth:`WindowForward.build` returns None for any other model, and the caller runs it whole.

The window pass is taken where it does at most two thirds of the full pass's multiply-adds
(:meth:`WindowForward.pays`); ``bench/square_window.py`` measures what it saves.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Layers applied to each value on its own (in eval mode): they run on the changed patch only.
POINTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.BatchNorm2d,
)

#: Commits after which the kept output of the head's first linear layer is recomputed whole.
REANCHOR = 100
#: The feature maps of a batch are kept only up to this many bytes (all layers together).
MAX_MAP_BYTES = 2**30


@dataclass(frozen=True)
class _Stage:
    """One convolution or max-pooling layer and the pointwise layers after it."""

    layer: nn.Module
    after: tuple[nn.Module, ...]
    kernel: tuple[int, int]  # the extent of the kernel, dilation included
    stride: tuple[int, int]
    padding: tuple[int, int]
    fill: float  # the value of padding cells: 0 for a convolution, -inf for max pooling
    size_in: tuple[int, int]
    size_out: tuple[int, int]

    def patch(self, changed: tuple[int, int]) -> tuple[int, int]:
        """Height and width of the output patch a changed ``changed`` input patch reaches."""
        rows, cols = (
            min(out, (r + k - 2) // s + 1)
            for r, k, s, out in zip(changed, self.kernel, self.stride, self.size_out)
        )
        return rows, cols

    def local(self, crop: Tensor) -> Tensor:
        """The layer on an input crop (already padded), then the pointwise layers."""
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            out = F.conv2d(
                crop, layer.weight, layer.bias, layer.stride, 0, layer.dilation, layer.groups
            )
        elif isinstance(layer, nn.MaxPool2d):
            out = F.max_pool2d(crop, layer.kernel_size, layer.stride, 0, layer.dilation)
        else:
            raise TypeError(f"not a convolution or max pooling: {type(layer).__name__}")
        for module in self.after:
            out = module(out)
        return out

    @property
    def cell_cost(self) -> int:
        """Multiply-adds per output cell, all channels (a pooling's few compares count 0)."""
        return self.layer.weight.numel() if isinstance(self.layer, nn.Conv2d) else 0

    def whole(self, x: Tensor) -> Tensor:
        for module in (self.layer, *self.after):
            x = module(x)
        return x


def _pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return int(value[0]), int(value[1])
    return None


def _layers(model: nn.Module) -> list[nn.Module] | None:
    """The layers of an exact ``nn.Sequential``, nested ones flattened; None otherwise."""
    if type(model) is not nn.Sequential:
        return None
    layers: list[nn.Module] = []
    for module in model:
        if type(module) is nn.Sequential:
            inner = _layers(module)
            if inner is None:
                return None
            layers.extend(inner)
        else:
            layers.append(module)
    return layers


def _has_hooks(model: nn.Module) -> bool:
    from torch.nn.modules import module as module_globals

    names = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_forward_hooks_always_called",
    )
    if any(getattr(module_globals, name, None) for name in names):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _stage(layer: nn.Module, size_in: tuple[int, int]) -> _Stage | None:
    """The stage of a convolution or max-pooling layer, or None when it is not one we handle."""
    if "forward" in vars(layer):  # an instance whose forward was replaced
        return None
    if type(layer) is nn.Conv2d:
        if layer.padding_mode != "zeros":
            return None
        kernel, stride = _pair(layer.kernel_size), _pair(layer.stride)
        padding, dilation, fill = _pair(layer.padding), _pair(layer.dilation), 0.0
    elif type(layer) is nn.MaxPool2d:
        if layer.ceil_mode or layer.return_indices:
            return None
        kernel, stride = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size)
        padding, dilation, fill = _pair(layer.padding), _pair(layer.dilation), float("-inf")
    else:
        return None
    if kernel is None or stride is None or padding is None or dilation is None:
        return None
    extent = ((kernel[0] - 1) * dilation[0] + 1, (kernel[1] - 1) * dilation[1] + 1)
    size_out = (
        (size_in[0] + 2 * padding[0] - extent[0]) // stride[0] + 1,
        (size_in[1] + 2 * padding[1] - extent[1]) // stride[1] + 1,
    )
    if min(size_out) < 1:
        return None
    return _Stage(layer, (), extent, stride, padding, fill, size_in, size_out)


def _pointwise(module: nn.Module) -> bool:
    if type(module) not in POINTWISE or module.training or "forward" in vars(module):
        return False
    if type(module) is nn.BatchNorm2d:
        return module.track_running_stats and module.running_mean is not None
    return True


@dataclass
class Patch:
    """A changed patch of a feature map, at the same place in every sample."""

    top: int
    left: int
    values: Tensor  # (n, C, h, w)

    def cells(self, feature: Tensor) -> Tensor:
        """The patch's place in ``feature`` (an unpadded map), a view."""
        h, w = self.values.shape[2:]
        return feature[:, :, self.top : self.top + h, self.left : self.left + w]


@dataclass
class Change:
    """What a window pass changed, for :meth:`WindowForward.commit`: the patch of every kept map
    and, with a linear head, that layer's new output."""

    patches: list[Patch]
    linear_out: Tensor | None


class WindowForward:
    """The forward pass of a convolutional ``nn.Sequential``, recomputing only the patches of its
    feature maps that a changed window of the input reaches.

    The state of the current points is a list of :attr:`n_maps` tensors kept by the caller like
    any per-sample tensor: the input of every spatial stage after the first (with that stage's
    padding around it, channels-last: a convolution runs faster on a channels-last slice), the
    head's input and, with a linear head, the output of its first layer.
    """

    def __init__(self, stages: list[_Stage], head: list[nn.Module]) -> None:
        self.stages, self.head = stages, head
        self.linear: nn.Linear | None = None
        if (
            len(head) >= 2
            and type(head[0]) is nn.Flatten
            and type(head[1]) is nn.Linear
            and head[0].start_dim == 1
            and head[0].end_dim == -1
            and not any("forward" in vars(m) for m in head[:2])
        ):
            self.linear = head[1]
        self.n_maps = len(stages) + (self.linear is not None)
        self._commits = 0

    @classmethod
    def build(cls, model: nn.Module, sample_shape: tuple[int, ...]) -> WindowForward | None:
        """The window forward of ``model`` for inputs ``(C, H, W)``, or None where it does not
        apply (see the module's docstring). The caller checks :meth:`map_bytes` against
        :data:`MAX_MAP_BYTES`."""
        layers = _layers(model)
        if layers is None or len(sample_shape) != 3 or model.training or _has_hooks(model):
            return None
        stages: list[_Stage] = []
        size = (sample_shape[1], sample_shape[2])
        position = 0
        while position < len(layers):
            stage = _stage(layers[position], size)
            if stage is None or layers[position].training:
                break
            position += 1
            after = []
            while position < len(layers) and _pointwise(layers[position]):
                after.append(layers[position])
                position += 1
            stages.append(replace(stage, after=tuple(after)))
            size = stage.size_out
        if not stages:
            return None
        return cls(stages, layers[position:])

    def _margin(self, k: int) -> tuple[int, int]:
        """The padding kept around map ``k``: that of the stage it feeds (none for the head's)."""
        return self.stages[k + 1].padding if k + 1 < len(self.stages) else (0, 0)

    def map_bytes(self, x: Tensor) -> int:
        """Bytes of the state kept for the batch ``x``."""
        channels, total = x.shape[1], 0
        for k, stage in enumerate(self.stages):
            if isinstance(stage.layer, nn.Conv2d):
                channels = stage.layer.out_channels
            pad_h, pad_w = self._margin(k)
            total += channels * (stage.size_out[0] + 2 * pad_h) * (stage.size_out[1] + 2 * pad_w)
        if self.linear is not None:
            total += self.linear.out_features
        return total * len(x) * x.element_size()

    def pays(self, window: tuple[int, int]) -> bool:
        """Whether the window pass is worth taking for a window of this size: it does at most
        two thirds of the full pass's multiply-adds in the convolutions and a linear head's first
        layer (the rest costs the same either way; the third left pays for copying slices)."""
        local = full = 0
        changed = window
        for stage in self.stages:
            changed = stage.patch(changed)
            local += changed[0] * changed[1] * stage.cell_cost
            full += stage.size_out[0] * stage.size_out[1] * stage.cell_cost
        if self.linear is not None:
            size = self.stages[-1].size_out
            local += self.linear.weight.numel() * changed[0] * changed[1] // (size[0] * size[1])
            full += self.linear.weight.numel()
        return 3 * local <= 2 * full

    def _run(self, modules: list[nn.Module], x: Tensor) -> Tensor:
        for module in modules:
            x = module(x)
        return x

    def start(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits of ``x`` (the model's own forward pass) and its state."""
        maps = []
        for k, stage in enumerate(self.stages):
            x = stage.whole(x)
            if k == len(self.stages) - 1:
                maps.append(x)
            else:
                pad_h, pad_w = self._margin(k)
                padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h), value=self.stages[k + 1].fill)
                maps.append(padded.contiguous(memory_format=torch.channels_last))
        if self.linear is None:
            return self._run(self.head, x), maps
        out = self._run(self.head[:2], x)
        maps.append(out)
        return self._run(self.head[2:], out), maps

    def __call__(
        self, candidate: Tensor, maps: list[Tensor], top: int, left: int, window: tuple[int, int]
    ) -> tuple[Tensor, Change]:
        """Logits of ``candidate``, which equals the points of state ``maps`` outside the window
        ``window`` at ``(top, left)``, with what changed (for :meth:`commit`). The state is left
        as it was."""
        patches: list[Patch] = []
        size = window
        for k, stage in enumerate(self.stages):
            out_h, out_w = stage.patch(size)
            # The first output row a change at row `top` reaches, kept inside the map.
            o_top = min(max(_first_reached(top, stage, 0), 0), stage.size_out[0] - out_h)
            o_left = min(max(_first_reached(left, stage, 1), 0), stage.size_out[1] - out_w)
            crop_top = o_top * stage.stride[0] - stage.padding[0]
            crop_left = o_left * stage.stride[1] - stage.padding[1]
            crop_size = (
                stage.stride[0] * (out_h - 1) + stage.kernel[0],
                stage.stride[1] * (out_w - 1) + stage.kernel[1],
            )
            if k == 0:
                crop = _crop(candidate, crop_top, crop_left, crop_size, stage.fill)
            else:  # from the kept map (padded), with the previous stage's changed patch in it
                crop = _crop(
                    maps[k - 1],
                    crop_top + stage.padding[0],
                    crop_left + stage.padding[1],
                    crop_size,
                    stage.fill,
                )
                _paste(crop, patches[-1].values, top - crop_top, left - crop_left)
            patches.append(Patch(o_top, o_left, stage.local(crop)))
            top, left, size = o_top, o_left, (out_h, out_w)
        last, patch = maps[len(self.stages) - 1], patches[-1]
        cells = patch.cells(last)
        if self.linear is not None:
            out = torch.addmm(
                maps[-1],
                (patch.values - cells).flatten(1),
                self.linear.weight[:, _flat_index(patch, last.shape[1:])].t(),
            )
            return self._run(self.head[2:], out), Change(patches, out)
        kept = cells.clone()
        cells.copy_(patch.values)
        try:
            logits = self._run(self.head, last)
            if logits.untyped_storage().data_ptr() == last.untyped_storage().data_ptr():
                logits = logits.clone()  # a head that returns a view of its input
        finally:
            cells.copy_(kept)
        return logits, Change(patches, None)

    def commit(self, maps: list[Tensor], change: Change, source: Tensor, dest: Tensor) -> None:
        """Write the changes of rows ``source`` into rows ``dest`` of the state ``maps`` (all of
        its rows), in place (index tensors of the same length)."""
        for k, patch in enumerate(change.patches):
            (pad_h, pad_w), (h, w) = self._margin(k), patch.values.shape[2:]
            top, left = patch.top + pad_h, patch.left + pad_w
            maps[k][dest, :, top : top + h, left : left + w] = patch.values[source]
        if change.linear_out is None:
            return
        maps[-1][dest] = change.linear_out[source]
        self._commits += 1
        if self._commits % REANCHOR == 0:  # the sums of differences, replaced by the product
            maps[-1].copy_(self._run(self.head[:2], maps[len(self.stages) - 1]))


def _flat_index(patch: Patch, shape: torch.Size) -> Tensor:
    """The positions of the patch's cells in a flattened ``(C, H, W)`` map, channel by channel."""
    channels, h, w = shape
    ph, pw = patch.values.shape[2:]
    device = patch.values.device
    rows = torch.arange(patch.top, patch.top + ph, device=device)
    cols = torch.arange(patch.left, patch.left + pw, device=device)
    return (
        torch.arange(channels, device=device)[:, None, None] * (h * w) + rows[:, None] * w + cols
    ).flatten()


def _first_reached(start: int, stage: _Stage, axis: int) -> int:
    """The first output index whose receptive field reaches input index ``start``:
    ``ceil((start + padding - kernel + 1) / stride)``."""
    return -(-(start + stage.padding[axis] - stage.kernel[axis] + 1) // stage.stride[axis])


def _crop(base: Tensor, top: int, left: int, size: tuple[int, int], fill: float) -> Tensor:
    """A copy of the ``size`` crop of ``base`` at ``(top, left)``; cells outside the map (the
    layer's padding) are ``fill``."""
    h, w = base.shape[2:]
    r0, r1 = max(top, 0), min(top + size[0], h)
    c0, c1 = max(left, 0), min(left + size[1], w)
    inside = base[:, :, r0:r1, c0:c1]
    pads = (c0 - left, left + size[1] - c1, r0 - top, top + size[0] - r1)
    return F.pad(inside, pads, value=fill) if any(pads) else inside.clone()


def _paste(crop: Tensor, patch: Tensor, top: int, left: int) -> None:
    """Write ``patch`` into ``crop`` with its corner at ``(top, left)``, in place; the cells
    falling outside the crop are left out (no output of the stage reads them)."""
    (h, w), (ph, pw) = crop.shape[2:], patch.shape[2:]
    r0, r1 = max(top, 0), min(top + ph, h)
    c0, c1 = max(left, 0), min(left + pw, w)
    if r0 < r1 and c0 < c1:
        crop[:, :, r0:r1, c0:c1] = patch[:, :, r0 - top : r1 - top, c0 - left : c1 - left]
