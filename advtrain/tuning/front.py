"""The non-dominated (Pareto) front of points to be maximised in every coordinate."""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether ``a`` is at least as good as ``b`` in every coordinate and better in one
    (every coordinate maximised)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(
        x > y for x, y in zip(a, b, strict=True)
    )


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """The indices of the points no other point dominates, in ascending order.

    Equal points are all kept (none dominates the other). Quadratic in the number of points,
    which for a sweep's trials (tens to hundreds) costs nothing beside one trial.
    """
    return [
        i
        for i, point in enumerate(points)
        if not any(dominates(other, point) for j, other in enumerate(points) if j != i)
    ]
