"""A user's table as a dataset: the encoding, load_table (CSV and Parquet), the generated
transactions table and its committed example files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advtrain.data import load_dataset, load_table, parse_schema
from advtrain.data.table_encoding import TableEncoding, label_text
from advtrain.data.transactions import (
    TRANSACTIONS_SCHEMA,
    transactions_csv,
    transactions_frame,
)
from advtrain.errors import DataError
from advtrain.feasibility import FeatureConstraints

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCHEMA = parse_schema(TRANSACTIONS_SCHEMA)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return transactions_frame(rows=600, seed=7)


@pytest.fixture(scope="module")
def csv_path(frame, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("table") / "tx.csv"
    frame.to_csv(path, index=False)
    return path


def small_table(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


SMALL_SCHEMA = """
[label]
column = "y"
[columns.n]
type = "integer"
[columns.flag]
type = "binary"
[columns.kind]
type = "categorical"
"""
SMALL_ROWS = "".join(
    f"{a},{n},{flag},{kind},{y}\n"
    for a, n, flag, kind, y in [
        (0.5, 1, "true", "web", "no"),
        (1.5, 2, "false", "app", "yes"),
        (2.5, 3, "true", "pos", "no"),
        (3.5, 4, "false", "web", "yes"),
    ]
    * 5
)
SMALL = "a,n,flag,kind,y\n" + SMALL_ROWS


# ---------------------------------------------------------------------- the encoding


def test_encode_decode_round_trip(frame):
    encoding = TableEncoding.fit(frame, SCHEMA)
    z = encoding.encode(frame)
    assert z.dtype == np.float32 and z.shape == (len(frame), encoding.n_features)
    assert (z >= 0).all() and (z <= 1).all()
    decoded = encoding.decode(z)
    features = [c for c in frame.columns if c != "fraud"]
    assert list(decoded.columns) == features == list(encoding.feature_columns)
    for name in features:
        kind = SCHEMA.column(name).type
        if kind == "continuous":
            np.testing.assert_allclose(decoded[name], frame[name], rtol=1e-6, atol=1e-6)
        else:
            assert (decoded[name].to_numpy() == frame[name].to_numpy()).all(), name
    assert decoded["tx_count_1h"].dtype == np.int64
    assert pd.api.types.is_string_dtype(decoded["channel"])
    raw = encoding.raw_numeric(z)
    hour = encoding.names.index("hour")
    assert raw.dtype == np.float64 and (raw[:, hour] == frame["hour"]).all()
    assert encoding.encode_labels(frame).tolist() == frame["fraud"].tolist()


def test_coordinates_names_and_bounds(frame):
    encoding = TableEncoding.fit(frame, SCHEMA)
    d = encoding.n_features
    assert d == 13 + 3 + 8  # 13 numeric columns, channel and merchant_category one-hot
    assert encoding.names[6:9] == ("channel=app", "channel=pos", "channel=web")
    assert encoding.groups == ((6, 9), (9, 17))
    assert encoding.lower.shape == encoding.upper.shape == (d,)
    assert (encoding.lower == 0).all() and (encoding.upper == 1).all()
    mutable = dict(zip(encoding.names, encoding.mutable, strict=True))
    assert not mutable["customer_age"] and not mutable["avg_amount_30d"]
    assert mutable["amount"] and mutable["channel=web"]
    direction = dict(zip(encoding.names, encoding.direction.tolist(), strict=True))
    assert direction["tx_count_24h"] == 1 and direction["card_present"] == -1
    assert direction["amount"] == 0
    # schema bounds fix offset/scale: amount in [0, 20000]
    amount = encoding.names.index("amount")
    assert encoding.offset[amount] == 0.0 and encoding.scale[amount] == 20000.0


def test_training_bounds_and_constant_columns():
    train = pd.DataFrame({"a": ["2", "4", "6"], "c": ["5", "5", "5"], "y": ["0", "1", "0"]})
    encoding = TableEncoding.fit(train, parse_schema('[label]\ncolumn = "y"\n'))
    assert encoding.offset.tolist() == [2.0, 5.0] and encoding.scale.tolist() == [4.0, 1.0]
    unseen = pd.DataFrame({"a": ["0", "8", "5"], "c": ["5", "9", "5"], "y": ["0", "0", "1"]})
    z = encoding.encode(unseen)  # clipped into [0, 1] as minmax_apply does
    np.testing.assert_allclose(z, [[0.0, 0.0], [1.0, 1.0], [0.75, 0.0]])
    assert encoding.positive == "1"  # the minority of two classes


def test_constraints_object_has_the_documented_shapes(frame):
    encoding = TableEncoding.fit(frame, SCHEMA)
    constraints = encoding.feature_constraints()
    d, r = encoding.n_features, len(SCHEMA.rules)
    assert isinstance(constraints, FeatureConstraints)
    assert constraints.offset.shape == constraints.scale.shape == (d,)
    assert constraints.offset.dtype == torch.float64
    assert constraints.integer.dtype == torch.bool and constraints.integer.shape == (d,)
    assert constraints.direction.dtype == torch.int8
    assert constraints.coefficients.shape == (r, d) and constraints.bounds.shape == (r,)
    assert constraints.groups == encoding.groups and constraints.names == encoding.names
    amount = encoding.names.index("amount")
    average = encoding.names.index("avg_amount_30d")
    assert constraints.coefficients[0, amount] == 1 and constraints.coefficients[0, average] == -40
    integer = set(np.array(encoding.names)[constraints.integer.numpy()])
    assert {"hour", "tx_count_1h", "card_present"} <= integer and "amount" not in integer


def test_json_round_trip_encodes_the_same(frame):
    encoding = TableEncoding.fit(frame, SCHEMA)
    again = TableEncoding.from_json(json.loads(json.dumps(encoding.to_json())))
    assert (again.encode(frame) == encoding.encode(frame)).all()
    assert again.names == encoding.names and again.classes == encoding.classes
    assert again.positive_class == encoding.positive_class == 1
    assert again.rule_matrix()[0].tolist() == encoding.rule_matrix()[0].tolist()
    with pytest.raises(DataError, match="invalid table encoding"):
        TableEncoding.from_json({"format": "something else"})
    broken = encoding.to_json()
    broken["columns"][0]["scale"] = 0
    with pytest.raises(DataError, match="scale must be a finite number > 0"):
        TableEncoding.from_json(broken)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("kind", "fax", "column 'kind' has category 'fax' never seen in training"),
        ("flag", "maybe", "column 'flag' \\(binary\\) has a value that is not a number"),
        ("flag", "2", "column 'flag' \\(binary\\) has a value that is not 0/1"),
        ("n", "2.5", "column 'n' \\(integer\\) has a value that is not an integer"),
        ("n", "", "column 'n' has a missing value \\(row 1\\)"),
        ("a", "NaN", "column 'a' \\(continuous\\) has a value that is not a number"),
        ("a", "inf", "column 'a' \\(continuous\\) has a value that is not finite"),
        ("a", "abc", "declare it categorical in the schema"),
        ("kind", " ", "column 'kind' has a missing value"),
        ("y", "maybe", "label column 'y' has value 'maybe' that is not a class"),
    ],
)
def test_bad_cells_are_one_line_errors(tmp_path, column, value, message):
    schema = parse_schema(SMALL_SCHEMA)
    dataset = load_table(small_table(tmp_path, SMALL), schema)
    assert dataset.info.encoding is not None
    frame = pd.read_csv(small_table(tmp_path, SMALL), dtype=str, keep_default_na=False)
    frame.loc[0, column] = value
    with pytest.raises(DataError, match=message) as caught:
        dataset.info.encoding.encode(frame)
        dataset.info.encoding.encode_labels(frame)
    assert "\n" not in str(caught.value)


def test_labels_are_canonical_and_sorted():
    assert [label_text(v) for v in (1, 1.0, "1", " 1 ", "1.0", True, "TRUE")] == [
        "1", "1", "1", "1", "1", "true", "true"
    ]  # fmt: skip
    train = pd.DataFrame({"a": ["1", "2", "3", "4"], "y": ["10", "2", "2.0", "10"]})
    encoding = TableEncoding.fit(train, parse_schema('[label]\ncolumn = "y"\npositive = 10\n'))
    assert encoding.classes == ("2", "10")  # sorted as numbers, not as text
    assert encoding.positive_class == 1 and encoding.encode_labels(train).tolist() == [1, 0, 0, 1]


# ---------------------------------------------------------------------- load_table


def test_csv_and_parquet_give_equal_tensors(frame, csv_path, tmp_path):
    parquet = tmp_path / "tx.parquet"
    frame.to_parquet(parquet, engine="pyarrow", index=False)
    a = load_table(csv_path, SCHEMA, seed=3)
    b = load_table(parquet, TRANSACTIONS_SCHEMA, seed=3)  # the schema as TOML text
    for name in ("train", "val", "test"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y), name
        assert (sa.rows == sb.rows).all()
    assert a.info.feature_names == b.info.feature_names
    assert a.info.name == "tx.csv" and a.info.kind == "tabular"


def test_the_split_is_seeded_stratified_and_a_partition(csv_path):
    first, again = load_table(csv_path, SCHEMA, seed=1), load_table(csv_path, SCHEMA, seed=1)
    other = load_table(csv_path, SCHEMA, seed=2)
    assert (first.test.rows == again.test.rows).all()
    assert not np.array_equal(first.test.rows, other.test.rows)
    rows = np.concatenate([first.train.rows, first.val.rows, first.test.rows])
    assert sorted(rows.tolist()) == list(range(600))
    assert (len(first.train), len(first.val), len(first.test)) == (420, 60, 120)
    positives = [int(s.y.sum()) for s in (first.train, first.val, first.test)]
    assert positives == [6, 1, 2]  # 9 fraud rows in 600, stratified
    assert first.table is not None and first.table.text.shape == (600, 16)


def test_info_carries_encoding_constraints_and_threat(csv_path):
    dataset = load_table(csv_path, SCHEMA)
    info = dataset.info
    assert info.classes == ("0", "1") and info.positive_class == 1
    assert info.default_eps == 0.05 and info.shape == (24,)
    assert info.mutable is not None and not bool(info.mutable[0])  # customer_age
    threat = info.threat_model()
    assert threat.constraints is info.constraints and threat.mask is not None
    x = dataset.test.x
    assert bool(threat.contains(x, x).all())


def test_the_generated_table_satisfies_every_rule():
    dataset = load_dataset("transactions")
    constraints = dataset.info.constraints
    assert constraints is not None and len(constraints.rules) == 4
    for split in (dataset.train, dataset.val, dataset.test):
        broken = constraints.violations(split.x, split.x)
        assert not any(bool(v.any()) for v in broken.values()), broken
    assert len(dataset.train) + len(dataset.val) + len(dataset.test) == 20_000
    share = float(dataset.train.y.float().mean())
    assert 0.013 < share < 0.017 and dataset.info.positive_class == 1
    frame = transactions_frame(rows=3000, seed=11)  # another seed: the rules hold too
    assert (frame["amount"] <= 40 * frame["avg_amount_30d"]).all()
    assert (frame["amount"] <= frame["credit_limit"]).all()
    assert (frame["tx_count_1h"] <= frame["tx_count_24h"]).all()


def test_the_committed_example_equals_the_generator():
    assert (EXAMPLES / "transactions.csv").read_text(encoding="utf-8") == transactions_csv()
    assert (EXAMPLES / "transactions.toml").read_text(encoding="utf-8") == TRANSACTIONS_SCHEMA
    from_file = load_table(EXAMPLES / "transactions.csv", EXAMPLES / "transactions.toml")
    registered = load_dataset("transactions")
    assert torch.equal(from_file.test.x, registered.test.x)


def test_a_fitted_encoding_evaluates_a_whole_new_file(csv_path, tmp_path):
    fitted = load_table(csv_path, SCHEMA).info.encoding
    assert fitted is not None
    new = tmp_path / "new.csv"
    transactions_frame(rows=50, seed=99).to_csv(new, index=False)
    dataset = load_table(new, None, encoding=fitted)
    assert len(dataset.train) == len(dataset.val) == 0 and len(dataset.test) == 50
    assert dataset.train.x.shape == (0, fitted.n_features)
    assert (dataset.test.rows == np.arange(50)).all()
    assert torch.equal(dataset.test.x, torch.as_tensor(fitted.encode(pd.read_csv(new))))
    renamed = pd.read_csv(new).assign(channel="phone")
    renamed.to_csv(new, index=False)
    with pytest.raises(DataError, match="column 'channel' has category 'phone' never seen"):
        load_table(new, None, encoding=fitted)


@pytest.mark.parametrize(
    ("text", "schema", "name", "message"),
    [
        (SMALL, SMALL_SCHEMA, "t.xlsx", "unknown format '.xlsx'; use one of: .csv, .parquet"),
        (SMALL, '[label]\ncolumn = "label"\n', "t.csv", "no label column 'label'"),
        (SMALL, SMALL_SCHEMA + "[columns.zz]\n[columns.qq]\n", "t.csv", "'zz', 'qq'"),
        (SMALL, SMALL_SCHEMA + "[constraints]\nrules=['a <= b']\n", "t.csv", "rule 'a <= b'"),
        ("a,y\n1,0\n2,0\n3,0\n", '[label]\ncolumn = "y"\n', "t.csv", "has 1 class\\(es\\)"),
        ("a,y\n1,0\n2,1\n3,0\n4,0\n", '[label]\ncolumn = "y"\n', "t.csv", "too few rows"),
        ("a,a,y\n1,2,0\n", '[label]\ncolumn = "y"\n', "t.csv", "duplicate column names: 'a'"),
        ("", '[label]\ncolumn = "y"\n', "t.csv", "is empty"),
        ("a,y\n1,0,5\n", '[label]\ncolumn = "y"\n', "t.csv", "cannot read table"),
        (SMALL, SMALL_SCHEMA + "[label.x]\n", "t.csv", "label"),
    ],
)
def test_load_table_errors(tmp_path, text, schema, name, message):
    path = small_table(tmp_path, text, name)
    with pytest.raises(DataError, match=message) as caught:
        load_table(path, schema)
    assert "\n" not in str(caught.value)


def test_missing_file_and_missing_schema(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_table(tmp_path / "none.csv", SMALL_SCHEMA)
    with pytest.raises(DataError, match="needs a schema"):
        load_table(small_table(tmp_path, SMALL), None)


def test_schema_eps_and_more_classes(tmp_path):
    text = "a,y\n" + "".join(f"{i},{'abc'[i % 3]}\n" for i in range(30))
    dataset = load_table(small_table(tmp_path, text), '[label]\ncolumn="y"\n[threat]\neps=0.2\n')
    assert dataset.info.classes == ("a", "b", "c") and dataset.info.positive_class is None
    assert dataset.info.default_eps == 0.2 and dataset.info.mutable is None


def test_existing_loaders_carry_no_table():
    fraud = load_dataset("fraud")
    assert fraud.info.encoding is None and fraud.info.constraints is None
    assert fraud.table is None and fraud.test.rows is None
    assert fraud.info.threat_model().constraints is None


@settings(max_examples=25, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["continuous", "integer", "binary", "categorical"]), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_random_tables_round_trip_and_are_feasible(kinds, seed):
    """Any schema of typed columns: encode/decode gives the cells back, and the encoded rows
    satisfy their own integer and one-hot constraints (hypothesis)."""
    rng = np.random.default_rng(seed)
    n = 12
    data: dict[str, object] = {}
    toml = '[label]\ncolumn = "y"\n'
    for i, kind in enumerate(["continuous", *kinds]):
        name = f"c{i}"
        toml += f'[columns.{name}]\ntype = "{kind}"\n'
        if kind == "continuous":
            data[name] = np.round(rng.normal(0, 100, n), 3)
        elif kind == "integer":
            data[name] = rng.integers(-50, 50, n)
        elif kind == "binary":
            data[name] = rng.integers(0, 2, n)
        else:
            data[name] = rng.choice(["a", "b b", "c,d"], n)
    data["y"] = np.arange(n) % 2
    frame = pd.DataFrame(data)
    encoding = TableEncoding.fit(frame, parse_schema(toml))
    z = encoding.encode(frame)
    decoded = encoding.decode(z)
    for name, kind in zip(decoded.columns, ["continuous", *kinds], strict=True):
        if kind == "continuous":
            np.testing.assert_allclose(decoded[name], frame[name], rtol=1e-5, atol=1e-4)
        else:
            assert decoded[name].tolist() == frame[name].tolist()
    x = torch.as_tensor(z)
    assert bool(encoding.feature_constraints().feasible(x, x).all())
