"""The geometry of the Square attack's proposals: the schedule of the window's size, where the
windows go, the l2 proposal's shape (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a
query-efficient black-box adversarial attack via random search", ECCV 2020), and random signs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import AdvtrainError

#: Iterations of a 10,000-query run after which ``p`` is halved (Andriushchenko et al. 2020).
P_MILESTONES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init: float, iteration: int, n_queries: int) -> float:
    """The fraction of features changed at ``iteration``: ``p_init`` halved at each milestone
    passed, with the milestones rescaled from 10,000 queries to ``n_queries``."""
    scaled = int(iteration / n_queries * 10000)
    return p_init / 2 ** sum(scaled > m for m in P_MILESTONES)


def window_shape(p: float, h: int, w: int, norm: str) -> tuple[int, int]:
    """Height and width of the window changing a fraction ``p`` of an ``h x w`` plane.

    A square of side ``round(sqrt(p * h * w))`` (at least 1 for linf; odd and at least 3 for l2),
    or a run of ``round(p * w)`` features when the plane is a single row; never larger than the
    plane.
    """
    side = round(p * w) if h == 1 else round(math.sqrt(p * h * w))
    if norm == "l2":
        side = max(side, 3)
        side += 1 - side % 2
    side = max(side, 1)
    return (1, min(side, w)) if h == 1 else (min(side, h, w),) * 2


def bump(rows: int, cols: int) -> Tensor:
    """Concentric rectangles of weights ``1 / (k + 1)^2`` (a pseudo-Gaussian), unit l2 norm.

    The cell at Chebyshev distance ``d`` from the centre gets the weights of the rings
    ``k = d, ..., K - 1``, ``K = max(rows, cols) // 2 + 1`` (Andriushchenko et al. 2020).
    """
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols)
    rings = max(rows // 2, cols // 2) + 1
    weights = 1.0 / torch.arange(1, rings + 1, dtype=torch.float64) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = sum of the rings k >= d
    down = (torch.arange(rows) - rows // 2).abs()
    across = (torch.arange(cols) - cols // 2).abs()
    dist = torch.maximum(down[:, None], across[None])
    values = tail[dist]
    return (values / values.norm()).float()


def eta(rows: int, cols: int) -> Tensor:
    """The l2 proposal shape: a bump on the first half of the window and minus a bump on the
    second half (halves of rows, or of columns for a single-row window), unit l2 norm."""
    if rows == 1:
        half = cols // 2
        shape = torch.cat([bump(1, half), -bump(1, cols - half)], dim=1)
    else:
        half = rows // 2
        shape = torch.cat([bump(half, cols), -bump(rows - half, cols)], dim=0)
    return shape / shape.norm()


def plane_shape(sample_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(C, H, W)`` of the planes the windows move on: ``(D,) -> (1, 1, D)``,
    ``(C, L) -> (C, 1, L)``, ``(C, H, 1) -> (C, 1, H)``, ``(C, H, W)`` unchanged."""
    if len(sample_shape) == 1:
        return (1, 1, sample_shape[0])
    if len(sample_shape) == 2:
        return (sample_shape[0], 1, sample_shape[1])
    if len(sample_shape) == 3:
        c, h, w = sample_shape
        return (c, 1, h) if w == 1 else (c, h, w)
    raise AdvtrainError(
        "Square takes inputs of shape (N, D), (N, C, L) or (N, C, H, W), got "
        f"{sample_shape} per sample"
    )


def random_corners(
    n: int,
    h: int,
    w: int,
    size: tuple[int, int],
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Top row and left column of one window of ``size`` per sample, uniform over the plane."""
    top = torch.randint(0, h - size[0] + 1, (n,), generator=generator, device=device)
    left = torch.randint(0, w - size[1] + 1, (n,), generator=generator, device=device)
    return top, left


def window_mask(
    top: Tensor, left: Tensor, h: int, w: int, size: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """The mask ``(n, 1, h, w)`` of each sample's window, and the row and column of every pixel
    relative to the window's corner, ``(n, h)`` and ``(n, w)``."""
    rows = torch.arange(h, device=top.device) - top[:, None]
    cols = torch.arange(w, device=top.device) - left[:, None]
    in_rows = (rows >= 0) & (rows < size[0])
    in_cols = (cols >= 0) & (cols < size[1])
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None], rows, cols


def window_indices(
    top: Tensor, left: Tensor, shape: tuple[int, int, int], size: tuple[int, int]
) -> Tensor:
    """Flat indices ``(n, c * sh * sw)`` of each sample's window in its flattened ``(c, h, w)``
    plane, channel by channel, for ``gather``/``scatter``."""
    c, h, w = shape
    device = top.device
    offsets = (
        torch.arange(size[0], device=device)[:, None] * w + torch.arange(size[1], device=device)
    ).flatten()
    channels = torch.arange(c, device=device)[:, None] * (h * w)
    corner = (top * w + left)[:, None, None]
    return (corner + channels + offsets).reshape(len(top), -1)


def random_signs(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Independent ``±1`` of ``like``'s dtype and device."""
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (bits * 2 - 1).to(like.dtype)


def tile_starts(length: int, side: int) -> list[int]:
    """Corners of ``length // side`` tiles centred as a block of five (clipped to the plane)."""
    start = max((length - 5 * side) // 2, 0)
    return [start + k * side for k in range(length // side) if start + k * side < length]


def nonempty_subsets(n: int, c: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """``(n, c)`` indicators of a uniformly drawn non-empty subset of ``c`` channels."""
    if c <= 62:
        code = torch.randint(1, 2**c, (n, 1), generator=generator, device=like.device)
        bits = (code >> torch.arange(c, device=like.device)) & 1
    else:  # independent coins, and one channel forced where none came up
        bits = torch.randint(0, 2, (n, c), generator=generator, device=like.device)
        forced = torch.randint(0, c, (n,), generator=generator, device=like.device)
        bits[torch.arange(n, device=like.device), forced] |= (bits.sum(1) == 0).long()
    return bits.to(like.dtype)
