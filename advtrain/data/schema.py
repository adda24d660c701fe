"""The schema of a user's table: its label, its columns' types and limits, and linear rules.

A schema is TOML (the shape of issue 22; every key below is read, no other is accepted, so a
misspelt key is an error instead of a silently ignored line)::

    [label]
    column = "fraud"          # the label column; its values become classes 0..K-1 in sorted order
    positive = 1              # optional: the class whose precision/recall/PR-AUC matter

    [columns.amount]
    type = "continuous"       # continuous | integer | binary | categorical
    min = 0.0                 # optional bounds; default: the training split's min and max
    max = 20000.0
    mutable = true            # default true; false = the attacker cannot change it
    direction = "any"         # any | increase | decrease (what an attacker may do to it)

    [columns.channel]
    type = "categorical"      # one-hot inside the model; categories from the training split

    [constraints]
    rules = ["amount <= 40 * avg_amount_30d", "tx_count_1h <= tx_count_24h"]

    [threat]                  # optional
    eps = 0.05                # default linf radius in the scaled feature space

A rule is one non-strict comparison (``<=`` or ``>=``) whose two sides are linear in column
names: numbers, names, ``+``, ``-``, unary ``-``, a product with a number, a division by a
number, parentheses. It is read with :func:`ast.parse` (``mode="eval"``; nothing is evaluated)
and normalised to ``sum(coefficients[col] * col) <= bound`` in raw units (a ``>=`` rule is
negated). Strict ``<``/``>`` and ``==`` are refused: the repair of
:class:`advtrain.feasibility.FeatureConstraints` guarantees closed half-spaces only, and
reading ``<`` as ``<=`` would quietly change the user's rule. A column name that is not a
Python identifier is written between backticks: ```amount (EUR)` <= 100``. This is the linear
part of TabularBench's constraint grammar (Simonetto et al., "Constrained adaptive attack:
effective adversarial attack against deep neural networks for tabular data", NeurIPS 2024).

Columns the schema does not name are continuous, mutable and bounded by the training split;
whether the named columns exist is checked against the table by :meth:`TableSchema.check_columns`
(called by :func:`advtrain.data.table.load_table`).
"""

from __future__ import annotations

import ast
import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..util import one_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    # tomli (a dependency below 3.11 only) is absent where mypy runs on 3.11
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

COLUMN_TYPES: tuple[str, ...] = ("continuous", "integer", "binary", "categorical")
DIRECTIONS: tuple[str, ...] = ("any", "increase", "decrease")
#: Numeric column types (bounds, rules and directions apply to them).
NUMERIC_TYPES: tuple[str, ...] = ("continuous", "integer", "binary")

_TOP_KEYS = ("label", "columns", "constraints", "threat")
_LABEL_KEYS = ("column", "positive")
_COLUMN_KEYS = ("type", "min", "max", "mutable", "direction")
_CONSTRAINT_KEYS = ("rules",)
_THREAT_KEYS = ("eps",)

LabelValue = str | int | float | bool


@dataclass(frozen=True)
class ColumnSpec:
    """One column of the schema: its type, optional raw bounds, mutability and direction."""

    type: str = "continuous"
    min: float | None = None
    max: float | None = None
    mutable: bool = True
    direction: str = "any"


@dataclass(frozen=True, eq=False)
class LinearRule:
    """``sum(coefficients[col] * col) <= bound`` in raw units; ``text`` as the user wrote it."""

    coefficients: dict[str, float]
    bound: float
    text: str

    def holds(self, values: Mapping[str, float], rtol: float = 0.0) -> bool:
        """Whether the rule holds for one row of raw ``values`` (with a relative slack)."""
        total = sum(c * float(values[name]) for name, c in self.coefficients.items())
        scale = 1.0 + sum(abs(c * float(values[n])) for n, c in self.coefficients.items())
        return total <= self.bound + rtol * (scale + abs(self.bound))


@dataclass(frozen=True, eq=False)
class TableSchema:
    """A parsed schema: see the module's docstring for the TOML it comes from.

    ``positive`` is the raw label value of the positive class (None: not given); ``eps`` the
    optional default radius from ``[threat]``.
    """

    label: str
    positive: LabelValue | None = None
    columns: dict[str, ColumnSpec] = field(default_factory=dict)
    rules: tuple[LinearRule, ...] = ()
    eps: float | None = None

    def column(self, name: str) -> ColumnSpec:
        """The spec of column ``name``; a column the schema does not name is continuous."""
        return self.columns.get(name, ColumnSpec())

    def check_columns(self, table_columns: Iterable[str]) -> None:
        """Refuse schema columns and rule columns that the table does not have.

        Raises:
            DataError: naming the missing label column, schema columns or rule columns.
        """
        present = set(table_columns)
        if self.label not in present:
            raise DataError(f"the table has no label column {self.label!r} (from [label] column)")
        missing = [name for name in self.columns if name not in present]
        if missing:
            raise DataError(
                f"schema names columns the table does not have: {', '.join(map(repr, missing))}"
            )
        for rule in self.rules:
            unknown = [name for name in rule.coefficients if name not in present]
            if unknown:
                raise DataError(
                    f"rule {rule.text!r} names columns the table does not have: "
                    f"{', '.join(map(repr, unknown))}"
                )
            if self.label in rule.coefficients:
                raise DataError(f"rule {rule.text!r} names the label column {self.label!r}")


# ---------------------------------------------------------------------- reading


def parse_schema(source: str | Path | Mapping[str, Any]) -> TableSchema:
    """Parse a schema from a TOML file path, TOML text or an already-loaded mapping.

    A ``str`` holding a newline, or an ``=`` and naming no file, is TOML text; any other
    ``str`` is a path.

    Raises:
        DataError: one line naming the problem (file, key, column or rule).
    """
    if isinstance(source, Mapping):
        return _schema_from_mapping(source)
    if isinstance(source, str) and (
        "\n" in source or ("=" in source and not Path(source).is_file())
    ):
        return _schema_from_mapping(_load_toml(source, "schema"))
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"schema file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read schema file '{path}': {one_line(exc)}") from None
    return _schema_from_mapping(_load_toml(text, f"schema '{path}'"))


def _load_toml(text: str, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{what} is not valid TOML: {one_line(exc)}") from None


def _check_keys(table: object, known: tuple[str, ...], where: str) -> Mapping[str, Any]:
    if not isinstance(table, Mapping):
        raise DataError(f"schema: {where} must be a table, got {type(table).__name__}")
    unknown = [str(k) for k in table if k not in known]
    if unknown:
        raise DataError(
            f"schema: unknown key {unknown[0]!r} in {where}; known keys: {', '.join(known)}"
        )
    return table


def _schema_from_mapping(data: Mapping[str, Any]) -> TableSchema:
    top = _check_keys(data, _TOP_KEYS, "the schema")
    if "label" not in top:
        raise DataError("schema: missing [label] table (with column = the label column)")
    label_table = _check_keys(top["label"], _LABEL_KEYS, "[label]")
    if "column" not in label_table:
        raise DataError("schema: missing label.column (the name of the label column)")
    label = label_table["column"]
    if not isinstance(label, str) or not label:
        raise DataError(f"schema: label.column must be a non-empty string, got {label!r}")
    positive = label_table.get("positive")
    if positive is not None and not isinstance(positive, str | int | float | bool):
        raise DataError(f"schema: label.positive must be a number or string, got {positive!r}")
    columns_table = top.get("columns", {})
    if not isinstance(columns_table, Mapping):
        raise DataError("schema: [columns] must hold one table per column ([columns.NAME])")
    columns = {str(name): _column(str(name), spec) for name, spec in columns_table.items()}
    if label in columns:
        raise DataError(f"schema: the label column {label!r} cannot also be a [columns] entry")
    constraints = _check_keys(top.get("constraints", {}), _CONSTRAINT_KEYS, "[constraints]")
    texts = constraints.get("rules", [])
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise DataError("schema: constraints.rules must be a list of strings")
    rules = tuple(parse_rule(text, columns) for text in texts)
    for rule in rules:
        if label in rule.coefficients:
            raise DataError(f"schema: rule {rule.text!r} names the label column {label!r}")
    threat = _check_keys(top.get("threat", {}), _THREAT_KEYS, "[threat]")
    eps = None
    if "eps" in threat:
        eps = _number(threat["eps"], "threat.eps")
        if not math.isfinite(eps) or eps <= 0:
            raise DataError(f"schema: threat.eps must be a finite number > 0, got {eps!r}")
    return TableSchema(label=label, positive=positive, columns=columns, rules=rules, eps=eps)


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"schema: {where} must be a number, got {value!r}")
    number = float(value)
    if math.isnan(number):
        raise DataError(f"schema: {where} must be a number, got nan")
    return number


def _column(name: str, spec: object) -> ColumnSpec:
    where = f"column {name!r}"
    table = _check_keys(spec, _COLUMN_KEYS, f"[columns.{name}]")
    kind = table.get("type", "continuous")
    if kind not in COLUMN_TYPES:
        raise DataError(
            f"schema: {where}: unknown type {kind!r}; choose one of: {', '.join(COLUMN_TYPES)}"
        )
    direction = table.get("direction", "any")
    if direction not in DIRECTIONS:
        raise DataError(
            f"schema: {where}: unknown direction {direction!r}; "
            f"choose one of: {', '.join(DIRECTIONS)}"
        )
    mutable = table.get("mutable", True)
    if not isinstance(mutable, bool):
        raise DataError(f"schema: {where}: mutable must be true or false, got {mutable!r}")
    low = None if "min" not in table else _number(table["min"], f"{where}: min")
    high = None if "max" not in table else _number(table["max"], f"{where}: max")
    if kind == "categorical":
        if low is not None or high is not None:
            raise DataError(f"schema: {where}: a categorical column takes no min or max")
        if direction != "any":
            raise DataError(f"schema: {where}: a categorical column takes no direction")
    for bound, key in ((low, "min"), (high, "max")):
        if bound is None:
            continue
        if not math.isfinite(bound):
            raise DataError(f"schema: {where}: {key} must be finite, got {bound}")
        if kind == "integer" and bound != round(bound):
            raise DataError(f"schema: {where}: {key} of an integer column must be an integer")
        if kind == "binary" and bound not in (0.0, 1.0):
            raise DataError(f"schema: {where}: {key} of a binary column must be 0 or 1")
    if low is not None and high is not None and low > high:
        raise DataError(f"schema: {where}: min {low:g} is greater than max {high:g}")
    return ColumnSpec(type=kind, min=low, max=high, mutable=mutable, direction=direction)


# ---------------------------------------------------------------------- rules

_BACKTICKED = re.compile(r"`([^`]*)`")
Linear = tuple[dict[str, float], float]  # (coefficients, constant)


def parse_rule(text: str, columns: Mapping[str, ColumnSpec] | None = None) -> LinearRule:
    """Parse one rule into ``sum(coefficients[col] * col) <= bound`` (see the module docstring).

    ``columns`` (the schema's) lets categorical columns be refused; names the schema does not
    declare are accepted here and checked against the table later.

    Raises:
        DataError: the rule does not parse, is not linear, uses ``==``/``<``/``>``, names a
            categorical column or no column at all.
    """
    placeholders: dict[str, str] = {}

    def hide(match: re.Match[str]) -> str:
        key = f"__col{len(placeholders)}__"
        placeholders[key] = match.group(1)
        return key

    try:
        tree = ast.parse(_BACKTICKED.sub(hide, text).strip(), mode="eval")
    except SyntaxError as exc:
        raise DataError(f"rule {text!r} does not parse: {one_line(exc.msg)}") from None
    node = tree.body
    if not isinstance(node, ast.Compare):
        raise DataError(f"rule {text!r} does not parse: expected one comparison with <= or >=")
    if len(node.ops) != 1:
        raise DataError(f"rule {text!r} does not parse: one comparison per rule, not a chain")
    op = node.ops[0]
    if not isinstance(op, ast.LtE | ast.GtE):
        symbol = {ast.Lt: "<", ast.Gt: ">", ast.Eq: "==", ast.NotEq: "!="}.get(type(op), "?")
        raise DataError(f"rule {text!r}: {symbol!r} is not allowed; rules are non-strict <= or >=")
    left = _linear(node.left, text, placeholders)
    right = _linear(node.comparators[0], text, placeholders)
    sign = 1.0 if isinstance(op, ast.LtE) else -1.0
    names = dict.fromkeys([*left[0], *right[0]])
    coefficients = {}
    for name in names:
        value = sign * (left[0].get(name, 0.0) - right[0].get(name, 0.0))
        if value != 0.0:
            coefficients[name] = value
    bound = sign * (right[1] - left[1]) + 0.0  # no -0.0
    if not coefficients:
        raise DataError(f"rule {text!r} names no column (its columns cancel out)")
    if not all(math.isfinite(v) for v in (*coefficients.values(), bound)):
        raise DataError(f"rule {text!r} has a coefficient or constant that is not finite")
    for name in coefficients:
        spec = None if columns is None else columns.get(name)
        if spec is not None and spec.type == "categorical":
            raise DataError(f"rule {text!r} names categorical column {name!r}; rules are numeric")
    return LinearRule(coefficients=coefficients, bound=bound, text=text)


def _linear(node: ast.expr, text: str, placeholders: Mapping[str, str]) -> Linear:
    """The linear form ``(coefficients, constant)`` of an expression, or a DataError."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise DataError(f"rule {text!r}: {node.value!r} is not a number or column")
        return {}, float(node.value)
    if isinstance(node, ast.Name):
        return {placeholders.get(node.id, node.id): 1.0}, 0.0
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        coefficients, constant = _linear(node.operand, text, placeholders)
        factor = -1.0 if isinstance(node.op, ast.USub) else 1.0
        return _scaled((coefficients, constant), factor)
    if isinstance(node, ast.BinOp):
        left = _linear(node.left, text, placeholders)
        right = _linear(node.right, text, placeholders)
        if isinstance(node.op, ast.Add | ast.Sub):
            sign = 1.0 if isinstance(node.op, ast.Add) else -1.0
            coefficients = dict(left[0])
            for name, value in right[0].items():
                coefficients[name] = coefficients.get(name, 0.0) + sign * value
            return coefficients, left[1] + sign * right[1]
        if isinstance(node.op, ast.Mult):
            if left[0] and right[0]:
                raise DataError(f"rule {text!r} is not linear: it multiplies two columns")
            return _scaled(right, left[1]) if not left[0] else _scaled(left, right[1])
        if isinstance(node.op, ast.Div):
            if right[0]:
                raise DataError(f"rule {text!r} is not linear: it divides by a column")
            if right[1] == 0.0:
                raise DataError(f"rule {text!r} divides by zero")
            return _scaled(left, 1.0 / right[1])
    what = ast.unparse(node)
    raise DataError(
        f"rule {text!r} is not linear in the columns: {what!r} is not allowed "
        "(only numbers, columns, +, -, * or / by a number, parentheses)"
    )


def _scaled(form: Linear, factor: float) -> Linear:
    return {name: factor * value for name, value in form[0].items()}, factor * form[1]
