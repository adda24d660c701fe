"""The table schema parser: the issue's TOML, linear rules, and every error case."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from advtrain.data.schema import ColumnSpec, TableSchema, parse_rule, parse_schema
from advtrain.errors import DataError

ISSUE_SCHEMA = """
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
rules = ["amount <= 40 * avg_amount_30d", "tx_count_1h <= tx_count_24h",
         "tx_count_24h - tx_count_1h >= 0"]
"""


def test_the_issue_schema_parses():
    schema = parse_schema(ISSUE_SCHEMA)
    assert schema.label == "fraud" and schema.positive == 1
    assert schema.columns["amount"] == ColumnSpec("continuous", 0.0, 20000.0, True, "any")
    assert schema.columns["channel"] == ColumnSpec("categorical")
    assert schema.column("not_named") == ColumnSpec()  # unnamed columns are continuous
    amount, velocity, difference = schema.rules
    assert amount.coefficients == {"amount": 1.0, "avg_amount_30d": -40.0}
    assert amount.bound == 0.0 and amount.text == "amount <= 40 * avg_amount_30d"
    assert velocity.coefficients == {"tx_count_1h": 1.0, "tx_count_24h": -1.0}
    # ">=" is negated into "<=": tx_count_1h - tx_count_24h <= 0
    assert difference.coefficients == {"tx_count_24h": -1.0, "tx_count_1h": 1.0}
    assert difference.bound == 0.0 and not math.copysign(1.0, difference.bound) < 0
    assert schema.eps is None


def test_path_mapping_and_text_agree(tmp_path):
    path = tmp_path / "schema.toml"
    path.write_text(ISSUE_SCHEMA, encoding="utf-8")
    from_path, from_str_path = parse_schema(path), parse_schema(str(path))
    from_mapping = parse_schema({"label": {"column": "fraud"}, "threat": {"eps": 0.1}})
    assert from_path.columns == from_str_path.columns == parse_schema(ISSUE_SCHEMA).columns
    assert from_mapping.label == "fraud" and from_mapping.eps == 0.1 and not from_mapping.rules


@pytest.mark.parametrize(
    ("text", "coefficients", "bound"),
    [
        ("2*(a - b)/4 + 3 >= -c", {"a": -0.5, "b": 0.5, "c": -1.0}, 3.0),
        ("a <= 1e3", {"a": 1.0}, 1000.0),
        ("-(a + 2) * 3 <= b - 1", {"a": -3.0, "b": -1.0}, 5.0),
        ("+a >= 0.5 * b", {"a": -1.0, "b": 0.5}, 0.0),
        ("`amount (EUR)` + b_2 <= 7", {"amount (EUR)": 1.0, "b_2": 1.0}, 7.0),
        ("a + b - b <= 2", {"a": 1.0}, 2.0),
    ],
)
def test_rules_normalise_to_less_equal(text, coefficients, bound):
    rule = parse_rule(text)
    assert rule.coefficients == pytest.approx(coefficients)
    assert rule.bound == pytest.approx(bound)
    assert rule.text == text


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(-5, 5), min_size=3, max_size=3),
    st.integers(-20, 20),
    st.lists(st.floats(-10, 10), min_size=3, max_size=3),
    st.booleans(),
)
def test_a_rule_holds_exactly_where_its_text_does(coefs, constant, values, greater):
    """The normalised rule agrees with the comparison written out (hypothesis)."""
    names = ("a", "b", "c")
    terms = " + ".join(f"({k}) * {n}" for k, n in zip(coefs, names, strict=True))
    op = ">=" if greater else "<="
    text = f"{terms} {op} {constant}"
    if all(k == 0 for k in coefs):
        with pytest.raises(DataError, match="names no column"):
            parse_rule(text)
        return
    rule = parse_rule(text)
    row = dict(zip(names, values, strict=True))
    lhs = sum(k * v for k, v in zip(coefs, values, strict=True))
    expected = lhs >= constant if greater else lhs <= constant
    if abs(lhs - constant) > 1e-9:
        assert rule.holds(row) == expected


BASE = '[label]\ncolumn = "y"\n'


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[columns.a]\ntype = "float"\n', "column 'a': unknown type 'float'"),
        ('[columns.a]\ndirection = "up"\n', "column 'a': unknown direction 'up'"),
        ("[columns.a]\nmutible = false\n", "unknown key 'mutible' in \\[columns.a\\]"),
        ('[columns.a]\nmin = "low"\n', "column 'a': min must be a number"),
        ('[columns.a]\nmutable = "no"\n', "column 'a': mutable must be true or false"),
        ("[columns.a]\nmin = 5.0\nmax = 1.0\n", "column 'a': min 5 is greater than max 1"),
        ('[columns.c]\ntype = "categorical"\nmin = 0\n', "column 'c': a categorical column"),
        ('[columns.c]\ntype = "categorical"\nmax = 3\n', "column 'c': a categorical column"),
        (
            '[columns.c]\ntype = "categorical"\ndirection = "increase"\n',
            "column 'c': a categorical column takes no direction",
        ),
        ('[columns.n]\ntype = "integer"\nmin = 0.5\n', "column 'n': min of an integer"),
        ('[columns.b]\ntype = "binary"\nmax = 2\n', "column 'b': max of a binary column"),
        ("[columns.a]\nmax = inf\n", "column 'a': max must be finite"),
        ("[columns.y]\n", "label column 'y' cannot also be"),
        ('[constraints]\nrules = ["a <= "]\n', "rule 'a <= ' does not parse"),
        ('[constraints]\nrules = ["a + b"]\n', "rule 'a \\+ b' does not parse: expected one"),
        ('[constraints]\nrules = ["a <= b <= c"]\n', "one comparison per rule"),
        ('[constraints]\nrules = ["a == 1"]\n', "'==' is not allowed"),
        ('[constraints]\nrules = ["a < 1"]\n', "'<' is not allowed"),
        ('[constraints]\nrules = ["a > 1"]\n', "'>' is not allowed"),
        ('[constraints]\nrules = ["a * b <= 1"]\n', "not linear: it multiplies two columns"),
        ('[constraints]\nrules = ["1 / a <= 1"]\n', "not linear: it divides by a column"),
        ('[constraints]\nrules = ["a / 0 <= 1"]\n', "divides by zero"),
        ('[constraints]\nrules = ["log(a) <= 1"]\n', "'log\\(a\\)' is not allowed"),
        ('[constraints]\nrules = ["a.b <= 1"]\n', "'a.b' is not allowed"),
        ('[constraints]\nrules = ["a ** 2 <= 1"]\n', "'a \\*\\* 2' is not allowed"),
        ('[constraints]\nrules = ["a <= True"]\n', "True is not a number or column"),
        ('[constraints]\nrules = ["a - a <= 1"]\n', "names no column"),
        ('[constraints]\nrules = ["y <= 1"]\n', "names the label column 'y'"),
        (
            '[columns.c]\ntype = "categorical"\n[constraints]\nrules = ["c <= 1"]\n',
            "names categorical column 'c'",
        ),
        ("[constraints]\nrules = [1]\n", "constraints.rules must be a list of strings"),
        ("[threat]\neps = -1\n", "threat.eps must be a finite number > 0"),
        ('[threat]\nnorm = "l2"\n', "unknown key 'norm' in \\[threat\\]"),
        ("[extra]\nx = 1\n", "unknown key 'extra' in the schema"),
        ("[label.more]\nx = 1\n", "unknown key 'more' in \\[label\\]"),
    ],
)
def test_each_schema_error_is_one_line_naming_it(toml, message):
    with pytest.raises(DataError, match=message) as caught:
        parse_schema(BASE + toml)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ('[columns.a]\ntype = "integer"\n', "missing \\[label\\] table"),
        ("[label]\npositive = 1\n", "missing label.column"),
        ("[label]\ncolumn = 3\n", "label.column must be a non-empty string"),
        ('[label]\ncolumn = "y"\npositive = [1]\n', "label.positive must be a number or string"),
        ("[label\ncolumn = 'y'", "is not valid TOML"),
        ("missing-schema.toml", "schema file 'missing-schema.toml' does not exist"),
    ],
)
def test_label_and_file_errors(source, message):
    with pytest.raises(DataError, match=message):
        parse_schema(source)


def test_columns_are_checked_against_the_table():
    schema = parse_schema(BASE + '[columns.a]\ntype = "integer"\n[constraints]\nrules=["a <= b"]\n')
    schema.check_columns(["a", "b", "y"])
    with pytest.raises(DataError, match="schema names columns the table does not have: 'a'"):
        schema.check_columns(["b", "y"])
    with pytest.raises(DataError, match=r"rule 'a <= b' names columns .* not have: 'b'"):
        schema.check_columns(["a", "y"])
    with pytest.raises(DataError, match="no label column 'y'"):
        TableSchema(label="y").check_columns(["a"])
