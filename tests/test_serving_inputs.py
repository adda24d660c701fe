"""The request bodies of a table run: raw CSV rows with a header, encoded as in training (the
path of ``/predict`` that the served digits run of test_serving does not take)."""

from __future__ import annotations

import pytest
import torch

from advtrain.data import parse_schema
from advtrain.data.table_encoding import TableEncoding
from advtrain.data.transactions import TRANSACTIONS_SCHEMA, transactions_frame
from advtrain.serving.inputs import InputError, InputSpec, parse_body


@pytest.fixture(scope="module")
def table():
    frame = transactions_frame(rows=60, seed=3)
    encoding = TableEncoding.fit(frame, parse_schema(TRANSACTIONS_SCHEMA))
    spec = InputSpec((encoding.n_features,), 0.0, 1.0, max_batch=8, kind="table", encoding=encoding)
    return frame.drop(columns=["fraud"]), encoding, spec


def test_raw_rows_are_encoded_as_in_training(table):
    features, encoding, spec = table
    rows = features.head(5)
    batch = parse_body(rows.to_csv(index=False).encode(), "text/csv; charset=utf-8", spec)
    assert batch.dtype == torch.float32 and batch.shape == (5, encoding.n_features)
    assert torch.allclose(batch, torch.from_numpy(encoding.encode(rows)))
    shuffled = rows[list(reversed(rows.columns))]  # columns are read by name
    assert torch.equal(parse_body(shuffled.to_csv(index=False).encode(), "text/csv", spec), batch)


def test_bad_table_bodies_are_4xx_naming_the_problem(table):
    features, _, spec = table
    missing = features.head(3).drop(columns=["hour"]).to_csv(index=False).encode()
    with pytest.raises(InputError, match="hour") as error:
        parse_body(missing, "text/csv", spec)
    assert error.value.status == 422
    with pytest.raises(InputError, match="exceeds the limit of 8") as error:
        parse_body(features.head(9).to_csv(index=False).encode(), "text/csv", spec)
    assert error.value.status == 413
    with pytest.raises(InputError, match="not UTF-8") as error:
        parse_body(b"\xff\xfe\x00", "text/csv", spec)
    assert error.value.status == 400
