"""Checks shared by the model builders: is this input shape one the architecture can take?"""

from __future__ import annotations

from ..errors import AdvtrainError


def as_shape(name: str, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """``in_shape`` as a tuple of positive ints, or an :class:`AdvtrainError` naming the model."""
    try:
        shape = tuple(in_shape)
    except TypeError:
        raise AdvtrainError(
            f"model {name!r}: in_shape must be a tuple of sizes, got {in_shape!r}"
        ) from None
    if not shape or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise AdvtrainError(
            f"model {name!r}: in_shape must be positive integer sizes, got {in_shape!r}"
        )
    return shape


def expect_shape(name: str, in_shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """Refuse any input shape but ``expected``."""
    if as_shape(name, in_shape) != expected:
        raise AdvtrainError(
            f"model {name!r} expects inputs of shape {expected}, got {tuple(in_shape)}"
        )


def expect_rank(name: str, in_shape: tuple[int, ...], rank: int, layout: str) -> tuple[int, ...]:
    """Refuse input shapes that do not have ``rank`` dimensions (``layout`` names them, e.g.
    ``"(C, H, W)"``)."""
    shape = as_shape(name, in_shape)
    if len(shape) != rank:
        raise AdvtrainError(f"model {name!r} expects inputs of shape {layout}, got {shape}")
    return shape
