"""Pictures of a trigger for the matrix page: a clean test image, the same image triggered, and
(clean-label) a poisoned training image, side by side, as a base64 PNG data URI."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from ..data import Split

if TYPE_CHECKING:
    from .backdoors import Backdoor, Poisoned

#: Each pixel drawn as a square of this many pixels (at least; small images are scaled more).
MIN_SIDE = 112


def _hwc(image: Tensor) -> np.ndarray:
    array = image.detach().cpu().float().numpy()
    return array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))


def trigger_picture(backdoor: Backdoor, test: Split, poisoned: Poisoned) -> str | None:
    """The pictures of ``backdoor``'s trigger (None for tables: their trigger is a list of
    feature values)."""
    x = test.x
    if not isinstance(x, Tensor) or x.ndim != 4:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import image as mpimg

    others = (test.y != backdoor.target).nonzero().flatten()
    if len(others) == 0:
        return None
    clean = x[others[:1]]
    panels = [clean[0], backdoor.apply(clean)[0]]
    if backdoor.labels == "clean":
        panels.append(poisoned.split.x[int(poisoned.indices[0])])
    arrays = [_hwc(p) for p in panels]
    h, w = arrays[0].shape[:2]
    scale = max(1, -(-MIN_SIDE // max(h, w)))
    gap_shape = (h, 2, *arrays[0].shape[2:])
    row: list[np.ndarray] = []
    for i, a in enumerate(arrays):
        if i:
            row.append(np.full(gap_shape, 0.5, dtype=np.float32))
        row.append(a)
    picture = np.concatenate(row, axis=1)
    picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    buffer = io.BytesIO()
    gray = picture.ndim == 2
    mpimg.imsave(
        buffer,
        np.clip(picture, 0, 1),
        format="png",
        cmap="gray" if gray else None,
        vmin=0.0,
        vmax=1.0,
        metadata={"Software": None},  # type: ignore[dict-item]  # None drops the key
    )
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
