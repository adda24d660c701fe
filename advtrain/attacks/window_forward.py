"""Forward passes of inputs that differ from known ones inside one small window per sample.

A score-based attack such as Square changes a few pixels per query, in one square window per
point. In a convolutional network only a patch of each feature map depends on that window: a
convolution or pooling layer with kernel ``k`` and stride ``s`` turns a changed band of ``R``
rows into at most ``(R + k - 2) // s + 1`` changed output rows. :class:`WindowForward` keeps the
feature maps of the current points and recomputes only those patches, layer by layer, from crops
of the layer's input; the layers after the last spatial one (the classifier head) run whole.

Every value is recomputed from the input, never updated by differences, so nothing drifts over a
long search: a feature map differs from the full forward pass only by the float rounding of a
convolution summed in another order (about 1e-7 relative). Callers that act on a decision (an
adversarial point) confirm it with the model itself.

It applies to an ``nn.Sequential`` (nested ones flattened) of exactly these types, in eval mode,
with no hooks: first ``Conv2d`` (zero padding, numeric) or ``MaxPool2d`` (no ``ceil_mode``), each
followed by any number of pointwise layers (ReLU and the other elementwise activations, eval-mode
``BatchNorm2d`` with running statistics, ``Dropout`` in eval mode, ``Identity``), then any head.
:meth:`WindowForward.build` returns None for any other model, and the caller runs it whole.

Whether the local pass pays depends on the model and the batch: the gathers and scatters it
needs cost about what it saves on a CNN as small as the fast-adversarial MNIST one (two
convolutions of 16 and 32 channels), while on the larger MNIST CNN of Madry et al. a 3x3 window
takes less than half the time of the full pass (850 images, 2 CPU threads). :class:`PathChooser`
therefore times both on the first queries of each window size and keeps the faster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Layers applied to each value on its own (in eval mode): they run on the changed patch only.
POINTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
             nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout,
             nn.Dropout2d, nn.BatchNorm2d)

#: Queries of each window size on which both passes are timed before the faster is kept.
TRIALS = 3
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
        return tuple(min(out, (r + k - 2) // s + 1) for r, k, s, out  # type: ignore[return-value]
                     in zip(changed, self.kernel, self.stride, self.size_out))

    def local(self, crop: Tensor) -> Tensor:
        """The layer on an input crop (already padded), then the pointwise layers."""
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            out = F.conv2d(crop, layer.weight, layer.bias, layer.stride, 0, layer.dilation,
                           layer.groups)
        else:
            out = F.max_pool2d(crop, layer.kernel_size, layer.stride, 0, layer.dilation)
        for module in self.after:
            out = module(out)
        return out

    def whole(self, x: Tensor) -> Tensor:
        for module in (self.layer, *self.after):
            x = module(x)
        return x


def _pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
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

    names = ("_global_forward_hooks", "_global_forward_pre_hooks",
             "_global_forward_hooks_always_called")
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
        kernel, stride = layer.kernel_size, layer.stride
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
    extent = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))
    size_out = tuple((n + 2 * p - e) // s + 1
                     for n, p, e, s in zip(size_in, padding, extent, stride))
    if min(size_out) < 1:
        return None
    return _Stage(layer, (), extent, stride, padding, fill,  # type: ignore[arg-type]
                  size_in, size_out)


def _pointwise(module: nn.Module) -> bool:
    if type(module) not in POINTWISE or module.training or "forward" in vars(module):
        return False
    if type(module) is nn.BatchNorm2d:
        return module.track_running_stats and module.running_mean is not None
    return True


def _cells(rows: Tensor, cols: Tensor, width: int) -> Tensor:
    """Flat indices ``(n, len(rows[0]) * len(cols[0]))`` of the cells at ``rows x cols``."""
    return (rows[:, :, None] * width + cols[:, None, :]).flatten(1)


@dataclass
class Patch:
    """A changed patch of a feature map: per sample its top-left cell and its values."""

    top: Tensor
    left: Tensor
    values: Tensor  # (n, C, h, w)

    def index(self, width: int) -> Tensor:
        """Flat indices of the patch's cells in a map of ``width`` columns, ``(n, C, h * w)``."""
        n, channels, h, w = self.values.shape
        device = self.top.device
        rows = self.top[:, None] + torch.arange(h, device=device)
        cols = self.left[:, None] + torch.arange(w, device=device)
        return _cells(rows, cols, width)[:, None].expand(n, channels, h * w)


class WindowForward:
    """The forward pass of a convolutional ``nn.Sequential``, recomputing only the patches of its
    feature maps that a changed window of the input reaches.

    The state of the current points is a list of feature maps (the input of every spatial stage
    after the first, and the head's input), kept by the caller like any per-sample tensor.
    """

    def __init__(self, stages: list[_Stage], head: list[nn.Module]) -> None:
        self.stages, self.head = stages, head

    @classmethod
    def build(cls, model: nn.Module, sample_shape: tuple[int, ...]) -> WindowForward | None:
        """The window forward of ``model`` for inputs ``(C, H, W)``, or None where it does not
        apply (see the module's docstring). The caller checks :meth:`map_bytes` against
        :data:`MAX_MAP_BYTES`."""
        layers = _layers(model)
        if layers is None or len(sample_shape) != 3 or model.training or _has_hooks(model):
            return None
        stages: list[_Stage] = []
        size = tuple(sample_shape[1:])
        position = 0
        while position < len(layers):
            stage = _stage(layers[position], size)  # type: ignore[arg-type]
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

    def map_bytes(self, x: Tensor) -> int:
        """Bytes of the feature maps kept for the batch ``x``."""
        channels, total = x.shape[1], 0
        for stage in self.stages:
            if isinstance(stage.layer, nn.Conv2d):
                channels = stage.layer.out_channels
            total += channels * stage.size_out[0] * stage.size_out[1]
        return total * len(x) * x.element_size()

    def reaches_all(self, window: tuple[int, int]) -> bool:
        """Whether a window of this size changes the whole of the last feature map (nothing to
        gain then)."""
        changed = window
        for stage in self.stages:
            changed = stage.patch(changed)
        return changed == self.stages[-1].size_out

    def _run_head(self, x: Tensor) -> Tensor:
        for module in self.head:
            x = module(x)
        return x

    def start(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits of ``x`` and its feature maps (the state), by the full forward pass."""
        maps = []
        for stage in self.stages:
            x = stage.whole(x)
            maps.append(x)
        return self._run_head(x), maps

    def __call__(self, candidate: Tensor, maps: list[Tensor], top: Tensor, left: Tensor,
                 window: tuple[int, int]) -> tuple[Tensor, list[Patch]]:
        """Logits of ``candidate``, which equals the points of state ``maps`` outside the window
        ``window`` at ``(top, left)``; returns them with the changed patches (for :meth:`commit`).
        """
        patches: list[Patch] = []
        changed: Patch | None = None
        size = window
        for k, stage in enumerate(self.stages):
            out_h, out_w = stage.patch(size)
            # The first output row a change at row `top` reaches, kept inside the map.
            first_top = changed.top if changed is not None else top
            first_left = changed.left if changed is not None else left
            o_top = _first_reached(first_top, stage, 0).clamp(0, stage.size_out[0] - out_h)
            o_left = _first_reached(first_left, stage, 1).clamp(0, stage.size_out[1] - out_w)
            crop_h = stage.stride[0] * (out_h - 1) + stage.kernel[0]
            crop_w = stage.stride[1] * (out_w - 1) + stage.kernel[1]
            base = candidate if k == 0 else maps[k - 1]
            crop = _crop(base, changed, o_top * stage.stride[0] - stage.padding[0],
                         o_left * stage.stride[1] - stage.padding[1], (crop_h, crop_w), stage.fill)
            changed = Patch(o_top, o_left, stage.local(crop))
            patches.append(changed)
            size = (out_h, out_w)
        last = maps[-1]
        n, channels = last.shape[:2]
        head_in = last.reshape(n, channels, -1).scatter(
            2, changed.index(last.shape[3]), changed.values.reshape(n, channels, -1))
        return self._run_head(head_in.reshape(last.shape)), patches

    @staticmethod
    def commit(maps: list[Tensor], patches: list[Patch], source: Tensor, dest: Tensor) -> None:
        """Write the patches of rows ``source`` into rows ``dest`` of the state ``maps``, in place
        (index tensors of the same length)."""
        for feature, patch in zip(maps, patches):
            channels = feature.shape[1]
            chosen = Patch(patch.top[source], patch.left[source], patch.values[source])
            flat = feature[dest].reshape(len(dest), channels, -1)
            flat.scatter_(2, chosen.index(feature.shape[3]),
                          chosen.values.reshape(len(dest), channels, -1))
            feature[dest] = flat.reshape(len(dest), *feature.shape[1:])


def _first_reached(start: Tensor, stage: _Stage, axis: int) -> Tensor:
    """The first output index whose receptive field reaches input index ``start``:
    ``ceil((start + padding - kernel + 1) / stride)``."""
    shifted = start + stage.padding[axis] - stage.kernel[axis] + 1
    return -torch.div(-shifted, stage.stride[axis], rounding_mode="floor")


def _crop(base: Tensor, changed: Patch | None, top: Tensor, left: Tensor, size: tuple[int, int],
          fill: float) -> Tensor:
    """Per sample, the ``size`` crop at ``(top, left)`` (may reach outside the map: those cells
    are ``fill``) of ``base`` with the ``changed`` patch written over it."""
    n, channels, h, w = base.shape
    device = base.device
    rows = top[:, None] + torch.arange(size[0], device=device)
    cols = left[:, None] + torch.arange(size[1], device=device)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    cells = _cells(rows.clamp(0, h - 1), cols.clamp(0, w - 1), w)
    crop = base.reshape(n, channels, -1).gather(2, cells[:, None].expand(n, channels, -1))
    if changed is not None:
        ph, pw = changed.values.shape[2:]
        r = rows - changed.top[:, None]
        c = cols - changed.left[:, None]
        hit = ((r >= 0) & (r < ph))[:, :, None] & ((c >= 0) & (c < pw))[:, None, :]
        picked = changed.values.reshape(n, channels, -1).gather(
            2, _cells(r.clamp(0, ph - 1), c.clamp(0, pw - 1), pw)[:, None].expand(n, channels, -1))
        crop = torch.where(hit.flatten(1)[:, None], picked, crop)
    crop = crop.masked_fill(~inside.flatten(1)[:, None], fill)
    return crop.reshape(n, channels, *size)


@dataclass
class PathChooser:
    """Per window size, which forward pass a search uses: both are run and timed on the first
    :data:`TRIALS` queries of each size (the full pass's results are the ones used), then the
    faster is kept. The local pass is given up for good the first time its logits differ from
    the full pass's by a single bit, so that the choice, which depends on timing, never changes
    a result: a seeded search gives the same points either way.
    """

    exact: bool = True
    timings: dict[tuple[int, int], list[tuple[float, float]]] = field(default_factory=dict)

    def mode(self, window: tuple[int, int]) -> str:
        """``"both"`` (still timing), ``"local"`` or ``"full"`` for a window of this size."""
        if not self.exact:
            return "full"
        trials = self.timings.get(window, [])
        if len(trials) < TRIALS:
            return "both"
        local = sorted(t for t, _ in trials)[TRIALS // 2]
        full = sorted(t for _, t in trials)[TRIALS // 2]
        return "local" if local < full else "full"

    def trial(self, forward: WindowForward, candidate: Tensor, maps: list[Tensor], top: Tensor,
              left: Tensor, window: tuple[int, int]) -> tuple[Tensor, list[Tensor]]:
        """Both passes on ``candidate``, timed; returns the full pass's logits and maps."""
        start = time.perf_counter()
        local_logits, _ = forward(candidate, maps, top, left, window)
        middle = time.perf_counter()
        logits, new_maps = forward.start(candidate)
        end = time.perf_counter()
        self.timings.setdefault(window, []).append((middle - start, end - middle))
        self.exact = self.exact and torch.equal(local_logits, logits)
        return logits, new_maps
