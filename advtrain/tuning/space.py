"""A sweep's search space, read from TOML: fixed settings, searched settings and the objective.

A space file has three tables::

    [train]                        # every trial's fixed settings: any TrainConfig key
    dataset = "digits"
    epochs = 10

    [space]                        # the searched settings: any TrainConfig key, or
    eps = { low = 0.1, high = 0.3 }                    # method_options.NAME
    lr = { low = 1e-4, high = 1e-2, log = true }
    epochs = { low = 5, high = 20, step = 5 }          # an integer key: integer bounds
    method = { choices = ["pgd", "trades"] }
    "method_options.beta" = { low = 1.0, high = 8.0, when = { method = ["trades"] } }

    [sweep]                        # optional; command-line flags override it
    objectives = ["clean", "robust"]   # the Pareto front; or ["robust"] alone
    min_clean = 0.97                   # a constraint: clean validation accuracy >= 0.97
    eval_eps = 0.2                     # the radius robust accuracy is measured at

``eval_eps`` (default: the fixed ``eps``, else the dataset's) is the one radius every trial's
robust accuracy is measured at, whatever eps it trains with: when eps is searched, robustness
at each trial's own eps would reward the smallest.

A range is ``low``/``high`` (with ``log`` for a log scale, ``step`` for a grid); a set of values
is ``choices``. ``when`` samples a setting only when earlier settings (searched or fixed) take
one of the listed values, Optuna's define-by-run conditional spaces (Akiba et al., "Optuna: A
Next-generation Hyperparameter Optimization Framework", KDD 2019). A setting's type follows the
TrainConfig field it sets (an integer field takes integer bounds); a method option is an integer
when both bounds are integers.

Every check fails with one line naming the key: an unknown key, a setting both fixed and
searched, an empty or reversed range, a log scale that reaches 0, a value the TrainConfig or the
method refuses (each bound and each choice is tried on the fixed settings before any trial).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdvtrainError
from ..threat import ThreatModel
from ..training.config import TrainConfig, config_keys
from ..training.methods import make_method

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found]  # a dependency on Python 3.10 only

#: The prefix of a searched method option (``method_options.beta``).
OPTION_PREFIX = "method_options."
#: The objectives a sweep can maximise (validation accuracies of the kept epoch).
OBJECTIVES = ("clean", "robust")
_PARAM_FIELDS = {"low", "high", "log", "step", "choices", "when"}
_SWEEP_FIELDS = {"objectives", "min_clean", "eval_eps", "sampler", "pruner"}
#: Settings a sweep decides for itself and a space may not search.
_NOT_SEARCHED = {"out", "device"}

Choice = bool | int | float | str


@dataclass(frozen=True)
class Param:
    """One searched setting: a range (``low``/``high``, ``log``, ``step``, ``integer``) or
    ``choices``; ``when`` maps earlier keys to the values that let it be sampled."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False
    choices: tuple[Choice, ...] | None = None
    when: dict[str, tuple[Choice, ...]] = field(default_factory=dict)

    def values_to_try(self) -> list[Choice]:
        """The values checked before any trial: both bounds, or every choice."""
        if self.choices is not None:
            return list(self.choices)
        assert self.low is not None and self.high is not None
        return [int(self.low), int(self.high)] if self.integer else [self.low, self.high]

    def applies(self, chosen: dict[str, Any]) -> bool:
        """Whether this setting is sampled, given the values chosen so far (and the fixed ones)."""
        return all(chosen.get(key) in values for key, values in self.when.items())

    def describe(self) -> str:
        """The setting's range or choices in a few words, for pages and messages."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")
            if self.step is not None:
                text += f" step {self.step:g}"
        if self.when:
            text += " when " + ", ".join(f"{k} in {list(v)}" for k, v in self.when.items())
        return text


@dataclass(frozen=True)
class SearchSpace:
    """The fixed settings (``base``), the searched ones in order, and the objective.

    ``objectives`` is ``("clean", "robust")`` (a Pareto front) or ``("robust",)`` (one
    objective); ``min_clean`` constrains clean validation accuracy in either case; ``eval_eps``
    is the radius robust accuracy is measured at (None: the dataset's default).
    """

    base: TrainConfig
    params: tuple[Param, ...]
    objectives: tuple[str, ...] = OBJECTIVES
    min_clean: float | None = None
    sampler: str | None = None
    pruner: str | None = None
    eval_eps: float | None = None

    def config(self, values: dict[str, Any], out: str) -> TrainConfig:
        """The fixed settings with ``values`` (searched keys to values) applied, writing to
        ``out``."""
        return apply_values(self.base, values).replace(out=out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "objectives": list(self.objectives),
            "min_clean": self.min_clean,
            "eval_eps": self.eval_eps,
            "params": {p.key: p.describe() for p in self.params},
        }


def apply_values(base: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """``base`` with each ``key = value`` set; ``method_options.NAME`` merges into the options."""
    changes: dict[str, Any] = {}
    options = dict(base.method_options)
    for key, value in values.items():
        if key.startswith(OPTION_PREFIX):
            options[key[len(OPTION_PREFIX) :]] = value
        else:
            changes[key] = value
    if options != base.method_options:
        changes["method_options"] = options
    return dataclasses.replace(base, **changes)


def load_space(path: str | Path, **sweep: Any) -> SearchSpace:
    """The search space in the TOML file ``path``; ``sweep`` entries that are not None override
    its ``[sweep]`` table (``objectives``, ``min_clean``, ``sampler``, ``pruner``)."""
    path = Path(path)
    if not path.is_file():
        raise AdvtrainError(f"search space '{path}' does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AdvtrainError(f"search space '{path}' is not valid TOML: {exc}") from None
    try:
        return parse_space(data, **sweep)
    except AdvtrainError as exc:
        raise AdvtrainError(f"search space '{path}': {exc}") from None


def parse_space(data: dict[str, Any], **sweep: Any) -> SearchSpace:
    """The search space a parsed TOML document describes (see the module docstring)."""
    unknown_tables = sorted(set(data) - {"train", "space", "sweep"})
    if unknown_tables:
        raise AdvtrainError(
            f"unknown table(s) {', '.join(unknown_tables)}; use [train], [space] and [sweep]"
        )
    fixed = _table(data, "train")
    searched = _table(data, "space")
    settings = {**_table(data, "sweep"), **{k: v for k, v in sweep.items() if v is not None}}
    if not searched:
        raise AdvtrainError("[space] searches nothing: give at least one setting to search")
    fixed = {key.replace("-", "_"): value for key, value in fixed.items()}
    unknown = sorted(set(fixed) - set(config_keys()))
    if unknown:
        raise AdvtrainError(f"[train]: unknown key(s) {', '.join(unknown)}")
    base = TrainConfig(**fixed)
    params = tuple(_param(key, spec, base) for key, spec in searched.items())
    _check_conditions(params, base, set(fixed))
    for param in params:
        _try_values(param, base, params)
    objectives, min_clean = _objectives(settings)
    return SearchSpace(
        base,
        params,
        objectives,
        min_clean,
        _optional_text(settings, "sampler"),
        _optional_text(settings, "pruner"),
        _eval_eps(settings.get("eval_eps", base.eps)),
    )


def _eval_eps(value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise AdvtrainError(f"eval_eps must be a radius > 0, got {value!r}")
    return float(value)


def _table(data: dict[str, Any], name: str) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise AdvtrainError(f"[{name}] must be a table")
    return table


def _optional_text(settings: dict[str, Any], name: str) -> str | None:
    value = settings.get(name)
    if value is not None and not isinstance(value, str):
        raise AdvtrainError(f"[sweep] {name} must be a name, got {value!r}")
    return value


def _objectives(settings: dict[str, Any]) -> tuple[tuple[str, ...], float | None]:
    unknown = sorted(set(settings) - _SWEEP_FIELDS)
    if unknown:
        raise AdvtrainError(
            f"[sweep]: unknown key(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_SWEEP_FIELDS))}"
        )
    objectives = settings.get("objectives", list(OBJECTIVES))
    if isinstance(objectives, str):
        objectives = [part.strip() for part in objectives.split(",")]
    if (
        not isinstance(objectives, list)
        or not objectives
        or any(o not in OBJECTIVES for o in objectives)
        or len(set(objectives)) != len(objectives)
    ):
        raise AdvtrainError(
            f"objectives must be ['clean', 'robust'] (a Pareto front) or ['robust'], "
            f"got {objectives!r}"
        )
    if objectives == ["clean"]:
        raise AdvtrainError("objectives ['clean'] alone is standard training; add 'robust'")
    min_clean = settings.get("min_clean")
    if min_clean is not None and (
        not isinstance(min_clean, (int, float))
        or isinstance(min_clean, bool)
        or not 0 <= min_clean <= 1
    ):
        raise AdvtrainError(f"min_clean must be an accuracy in [0, 1], got {min_clean!r}")
    ordered = tuple(o for o in OBJECTIVES if o in objectives)
    return ordered, None if min_clean is None else float(min_clean)


def _is_integer_field(key: str) -> bool:
    hints = typing.get_type_hints(TrainConfig)
    return key in hints and hints[key] in (int, int | None)


def _number(key: str, name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise AdvtrainError(f"{key}: {name} must be a finite number, got {value!r}")
    return value


def _param(key: str, spec: object, base: TrainConfig) -> Param:
    """One ``[space]`` entry, checked."""
    name = key.replace("-", "_")
    if name.startswith(OPTION_PREFIX):
        option = name[len(OPTION_PREFIX) :]
        if not option.isidentifier():
            raise AdvtrainError(f"{key}: {option!r} is not a valid method option name")
    elif name not in config_keys():
        raise AdvtrainError(
            f"unknown key {key!r} in [space]; search a TrainConfig key or method_options.NAME"
        )
    elif name in _NOT_SEARCHED or name == "method_options":
        raise AdvtrainError(f"{key} cannot be searched (search method_options.NAME instead)")
    if not isinstance(spec, dict):
        raise AdvtrainError(
            f"{key}: give a range {{ low = ..., high = ... }} or {{ choices = [...] }}"
        )
    unknown = sorted(set(spec) - _PARAM_FIELDS)
    if unknown:
        raise AdvtrainError(
            f"{key}: unknown field(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_PARAM_FIELDS))}"
        )
    when = _when(key, spec.get("when", {}))
    if "choices" in spec:
        if {"low", "high", "log", "step"} & set(spec):
            raise AdvtrainError(f"{key}: give choices or a range (low/high), not both")
        return Param(name, choices=_choices(key, spec["choices"]), when=when)
    return _range(key, name, spec, when)


def _range(key: str, name: str, spec: dict[str, Any], when: dict[str, tuple[Choice, ...]]) -> Param:
    """A ``low``/``high`` entry, checked."""
    if "low" not in spec or "high" not in spec:
        raise AdvtrainError(f"{key}: a range needs both low and high (or give choices)")
    low, high = _number(key, "low", spec["low"]), _number(key, "high", spec["high"])
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise AdvtrainError(f"{key}: log must be true or false, got {log!r}")
    if name.startswith(OPTION_PREFIX):
        integer = isinstance(spec["low"], int) and isinstance(spec["high"], int)
    else:
        integer = _is_integer_field(name)
    if integer and not (isinstance(spec["low"], int) and isinstance(spec["high"], int)):
        raise AdvtrainError(f"{key} is an integer setting: give integer low and high")
    if not low < high:
        raise AdvtrainError(f"{key}: low ({low:g}) must be below high ({high:g})")
    if log and low <= 0:
        raise AdvtrainError(f"{key}: a log scale needs low > 0, got {low:g}")
    step = spec.get("step")
    if step is not None:
        step = _number(key, "step", step)
        if step <= 0 or (integer and not isinstance(spec["step"], int)):
            raise AdvtrainError(
                f"{key}: step must be a positive {'integer' if integer else 'number'}"
            )
        if log:
            raise AdvtrainError(f"{key}: step and log do not go together (Optuna refuses both)")
    return Param(name, low, high, log, step, integer, None, when)


def _choices(key: str, value: object) -> tuple[Choice, ...]:
    if not isinstance(value, list) or not value:
        raise AdvtrainError(f"{key}: choices must be a non-empty list")
    for item in value:
        if not isinstance(item, (bool, int, float, str)):
            raise AdvtrainError(
                f"{key}: each choice must be a number, true/false or text, got {item!r}"
            )
    if len(set(map(repr, value))) != len(value):
        raise AdvtrainError(f"{key}: a choice is listed twice")
    return tuple(value)


def _when(key: str, value: object) -> dict[str, tuple[Choice, ...]]:
    if not isinstance(value, dict):
        raise AdvtrainError(f'{key}: when must be a table such as {{ method = ["trades"] }}')
    found: dict[str, tuple[Choice, ...]] = {}
    for name, allowed in value.items():
        items = allowed if isinstance(allowed, list) else [allowed]
        found[str(name).replace("-", "_")] = _choices(f"{key}: when {name}", items)
    return found


def _check_conditions(params: tuple[Param, ...], base: TrainConfig, given: set[str]) -> None:
    """No key searched twice or also fixed; ``when`` names a key fixed or searched earlier."""
    seen: set[str] = set()
    fixed = {f.name for f in dataclasses.fields(TrainConfig)}
    for param in params:
        if param.key in seen:
            raise AdvtrainError(f"{param.key} is searched twice")
        if param.key in given:
            raise AdvtrainError(f"{param.key} is both fixed in [train] and searched")
        if param.key.startswith(OPTION_PREFIX):
            option = param.key[len(OPTION_PREFIX) :]
            if option in base.method_options:
                raise AdvtrainError(f"{param.key} is both fixed in [train] and searched")
        for name in param.when:
            if name not in seen and name not in fixed:
                raise AdvtrainError(
                    f"{param.key}: when names {name!r}, which is neither a setting nor searched "
                    "before it"
                )
        seen.add(param.key)


def _try_values(param: Param, base: TrainConfig, params: tuple[Param, ...]) -> None:
    """Each bound or choice of ``param`` on the fixed settings (the first value of the settings
    its ``when`` names), and a method option on every method it may meet."""
    context: dict[str, Any] = {}
    for name, allowed in param.when.items():
        context[name] = allowed[0]
    for value in param.values_to_try():
        try:
            config = apply_values(base, {**context, param.key: value})
        except AdvtrainError as exc:
            raise AdvtrainError(f"{param.key} = {value!r}: {exc}") from None
        if param.key.startswith(OPTION_PREFIX) or param.key == "method":
            for method in _methods_met(param, config, params):
                _try_method(param, method, apply_values(config, {"method": method}), value)


def _methods_met(param: Param, config: TrainConfig, params: tuple[Param, ...]) -> list[str]:
    if param.key == "method":
        return [config.method]
    if "method" in param.when:
        return [str(m) for m in param.when["method"]]
    searched = [p for p in params if p.key == "method"]
    if searched and searched[0].choices is not None:
        return [str(m) for m in searched[0].choices]
    return [config.method]


def _try_method(param: Param, method: str, config: TrainConfig, value: Choice) -> None:
    threat = ThreatModel(norm=config.norm, eps=0.1 if config.eps is None else config.eps)  # type: ignore[arg-type]
    try:
        make_method(
            method,
            threat,
            steps=config.attack_steps,
            step_size=config.attack_step_size,
            **config.method_options,
        )
    except AdvtrainError as exc:
        hint = (
            " (add when = { method = [...] } to search it only for the methods that take it)"
            if param.key.startswith(OPTION_PREFIX)
            else ""
        )
        raise AdvtrainError(
            f"{param.key} = {value!r} with method {method!r}: {exc}{hint}"
        ) from None
