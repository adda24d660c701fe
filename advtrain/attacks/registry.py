"""One registry of attacks by name, filled by the ``@register`` decorator of each attack file."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import unknown

if TYPE_CHECKING:
    from .base import Attack

ATTACKS: dict[str, type[Attack]] = {}
A = TypeVar("A", bound="type[Attack]")


def register(name: str) -> Callable[[A], A]:
    """Class decorator: make an attack available as ``make_attack(name, ...)``."""

    def decorate(cls: A) -> A:
        if name in ATTACKS:
            raise RuntimeError(f"attack {name!r} registered twice")
        cls.name = name
        ATTACKS[name] = cls
        return cls

    return decorate


def make_attack(name: str, *args: Any, **kwargs: Any) -> Attack:
    """Build the attack registered under ``name`` with the given arguments."""
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise unknown("attack", name, list(ATTACKS)) from None
    return cls(*args, **kwargs)
