"""``advtrain attack --option key=value``: the attack's hyperparameters, typed and checked against
the arguments its constructor takes (:func:`advtrain.attacks.registry.init_parameters`) before
any work, with the message the command line's user needs: the options ``--option`` can set."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..attacks.registry import init_parameters
from ..errors import AdvtrainError
from ..util import parse_key_values

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
    """``--option key=value`` pairs as keyword arguments (see
    :func:`~advtrain.util.parse_key_values`), refusing the arguments other flags or the dataset
    set."""
    options = parse_key_values(items, "--option", "steps=100")
    for key in options:
        if key in ARGS_FROM_FLAGS:
            raise AdvtrainError(f"--option {key}: use {ARGS_FROM_FLAGS[key]} instead")
        if key in ARGS_FROM_DATA:
            raise AdvtrainError(
                f"--option {key}: the threat model comes from the dataset (--norm, --eps)"
            )
    return options


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
