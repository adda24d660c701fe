"""``advtrain attack --option key=value``: the attack's hyperparameters, typed and checked against
the arguments its constructor takes (:func:`advtrain.attacks.registry.init_parameters`) before
any work, with the message the command line's user needs: the options ``--option`` can set."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..attacks.registry import init_parameters
from ..errors import AdvtrainError

if TYPE_CHECKING:
    from ..attacks import Attack
    from ..threat import ThreatModel

# Attack arguments the command line sets itself, with the flag that sets them.
ARGS_FROM_FLAGS = {
    "norm": "--norm",
    "eps": "--eps",
    "restarts": "--restarts",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "progress": "--progress",
}
ARGS_FROM_DATA = ("threat", "lower", "upper", "mask")


def parse_attack_options(items: tuple[str, ...]) -> dict[str, Any]:
    """``--option key=value`` pairs as keyword arguments: ``step-size`` is ``step_size``; values
    are int, float, bool (true/false) or else text."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise AdvtrainError(f"--option {item!r} must look like key=value, e.g. steps=100")
        if key in options:
            raise AdvtrainError(f"--option {key} is given twice")
        if key in ARGS_FROM_FLAGS:
            raise AdvtrainError(f"--option {key}: use {ARGS_FROM_FLAGS[key]} instead")
        if key in ARGS_FROM_DATA:
            raise AdvtrainError(
                f"--option {key}: the threat model comes from the dataset (--norm, --eps)"
            )
        options[key] = _parse_option_value(text.strip())
    return options


def _parse_option_value(text: str) -> int | float | bool | str:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def check_attack_options(name: str, cls: type, options: dict[str, Any]) -> set[str] | None:
    """Refuse options the attack does not take and arguments the command line cannot give;
    return the names the attack accepts (None: unknown, left to the constructor)."""
    parameters = init_parameters(cls)
    if parameters is None:
        return None
    settable = sorted(p for p in parameters if p not in ARGS_FROM_FLAGS and p not in ARGS_FROM_DATA)
    for key in options:
        if key not in parameters:
            raise AdvtrainError(
                f"attack {name!r} has no option {key!r}; its options: "
                f"{', '.join(settable) or 'none'}"
            )
    missing = [
        p.name
        for p in parameters.values()
        if p.default is p.empty and p.name != "threat" and p.name not in options
    ]
    if missing:
        raise AdvtrainError(
            f"attack {name!r} needs {', '.join(missing)}, which the command line cannot give"
        )
    return set(parameters)


def build_attack(name: str, threat: ThreatModel, **kwargs: Any) -> Attack:
    from ..attacks import make_attack
    from ..util import one_line

    try:
        return make_attack(name, threat, **kwargs)
    except AdvtrainError:
        raise
    except (TypeError, ValueError) as exc:  # an option the attack refuses, or of the wrong type
        raise AdvtrainError(
            f"attack {name!r} cannot be built with these options: {one_line(exc)}"
        ) from None
