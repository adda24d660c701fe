"""One registry of attacks by name, filled by the ``@register`` decorator of each attack file, and
the options each attack's constructor takes."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import AdvtrainError, unknown

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
    """Build the attack registered under ``name`` with the given arguments; an option it does not
    take is an :class:`~advtrain.errors.AdvtrainError` listing the ones it does."""
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise unknown("attack", name, list(ATTACKS)) from None
    return cls(*args, **kwargs)


@functools.cache
def init_parameters(cls: type) -> dict[str, inspect.Parameter] | None:
    """The keyword parameters a class's constructor takes, following ``**options`` up the
    ``__init__`` chain (an ``__init__`` that takes ``**`` passes them to its parent's); None when
    they cannot be told (a constructor ``inspect`` cannot read). Cached per class: do not
    change the result."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if klass is object:
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            parameters = list(inspect.signature(init).parameters.values())[1:]  # not self
        except (TypeError, ValueError):
            return None
        for p in parameters:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                found.setdefault(p.name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return found


def attack_options(cls: type) -> dict[str, Any]:
    """The options of an attack class, by name, with their defaults (``inspect.Parameter.empty``
    where there is none): every keyword its constructor takes, the threat model's included."""
    parameters = init_parameters(cls) or {}
    options = {name: p.default for name, p in parameters.items()}
    if options.get("norm", 0) is None:  # the norm of a threat model built from keywords
        options["norm"] = getattr(cls, "default_norm", None)
    return options


def check_options(cls: type, kwargs: Mapping[str, object]) -> None:
    """Refuse, in one line, keyword arguments the attack's constructor does not take."""
    parameters = init_parameters(cls)
    if parameters is None:
        return
    wrong = [key for key in kwargs if key not in parameters]
    if wrong:
        registered = getattr(cls, "name", "")
        name = f"{registered!r} ({cls.__name__})" if registered else repr(cls.__name__)
        valid = ", ".join(sorted(p for p in parameters if p != "threat")) or "none"
        raise AdvtrainError(
            f"attack {name} has no option {', '.join(map(repr, wrong))}; its options: {valid}"
        )
