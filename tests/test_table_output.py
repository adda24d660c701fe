"""Adversarial rows written back in the user's own terms: the CSV round trip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from advtrain.data import load_dataset, load_table, write_adversarial_csv
from advtrain.data.table_output import float_text
from advtrain.errors import DataError

SCHEMA = """
[label]
column = "label"
positive = "fraud"
[columns.count]
type = "integer"
[columns.online]
type = "binary"
[columns.channel]
type = "categorical"
"""
# Text a re-formatting would change: trailing zeros, a quoted comma, spaces, a sign, an exponent.
ROWS = [
    '12.50,3,true,web,"Main St, 4",legit',
    "0.100,1,false,app,x,legit",
    "7,2,1,pos, padded ,fraud",
    "+3.0,5,0,web,,legit",
    "1e1,4,TRUE,app,y,legit",
    "2.25,0,False,pos,z,fraud",
]


def write_input(tmp_path, terminator="\n"):
    header = "amount,count,online,channel,note,label"
    path = tmp_path / "in.csv"
    text = terminator.join([header, *ROWS * 4]) + terminator
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.fixture()
def table_path(tmp_path):
    path = write_input(tmp_path)
    text = path.read_text().replace(",,legit", ",n,legit")
    path.write_text(text)
    return path


def load(path, **kw):
    # `note` is free text: categorical, so the table loads (it has no empty cells)
    return load_table(path, SCHEMA + '[columns.note]\ntype = "categorical"\n', **kw)


def test_unchanged_rows_are_written_back_byte_identical(table_path, tmp_path):
    dataset = load(table_path)
    split = dataset.test
    out = tmp_path / "adv.csv"
    pred = split.y.clone()
    write_adversarial_csv(out, dataset, split.rows, split.x, split.x, pred, pred, pred < 0)
    lines = table_path.read_bytes().split(b"\n")
    written = out.read_bytes().split(b"\n")
    assert written[0] == lines[0] + b",pred_clean,pred_adv,success"
    classes = dataset.info.classes
    for row, line, label in zip(split.rows, written[1:], pred, strict=False):
        original = lines[1 + int(row)]
        suffix = f",{classes[int(label)]},{classes[int(label)]},False".encode()
        assert line == original + suffix
    assert written[-1] == b"" and len(written) == len(split) + 2


def test_changed_cells_are_reformatted_and_the_rest_kept(table_path, tmp_path):
    dataset = load(table_path)
    encoding = dataset.info.encoding
    rows = np.arange(6)
    x = torch.as_tensor(encoding.encode(dataset.table.text.iloc[rows]))
    x_adv = x.clone()
    names = encoding.names
    x_adv[0, names.index("count")] = x[0, names.index("count")] + 1 / encoding.scale[1]
    x_adv[1, names.index("channel=app")] = 0.0
    x_adv[1, names.index("channel=web")] = 1.0
    x_adv[2, names.index("online")] = 0.0
    amount = names.index("amount")
    x_adv[3, amount] = (3.3 - encoding.offset[amount]) / encoding.scale[amount]
    pred_clean = torch.tensor([0, 0, 1, 0, 0, 1])
    pred_adv = torch.tensor([1, 0, 0, 0, 0, 1])
    success = pred_adv != pred_clean
    out = tmp_path / "adv.csv"
    write_adversarial_csv(out, dataset.table, rows, x, x_adv, pred_clean, pred_adv, success)
    lines = out.read_text().splitlines()
    assert lines[1] == '12.50,4,true,web,"Main St, 4",legit,fraud,legit,True'  # count 3 -> 4
    assert lines[2] == "0.100,1,false,web,x,legit,fraud,fraud,False"  # app -> web
    assert lines[3] == "7,2,0,pos, padded ,fraud,legit,fraud,True"  # online 1 -> 0
    assert lines[4] == "3.3,5,0,web,n,legit,fraud,fraud,False"  # amount +3.0 -> 3.3
    assert lines[5:7] == [ROWS[4] + ",fraud,fraud,False", ROWS[5] + ",legit,legit,False"]
    assert dataset.info.classes == ("fraud", "legit") and dataset.info.positive_class == 0
    back = pd.read_csv(out, dtype=str, keep_default_na=False)
    again = encoding.encode(back)
    assert np.array_equal(again, x_adv.numpy())  # the file holds exactly the attacked rows


def test_crlf_files_keep_their_terminator(tmp_path):
    path = write_input(tmp_path, "\r\n")
    path.write_bytes(path.read_bytes().replace(b",,legit", b",n,legit"))
    dataset = load(path)
    split = dataset.val
    out = tmp_path / "adv.csv"
    write_adversarial_csv(out, dataset, split.rows, split.x, split.x, split.y, split.y, split.y < 0)
    original = path.read_bytes().split(b"\r\n")
    written = out.read_bytes().split(b"\r\n")
    assert written[1].startswith(original[1 + int(split.rows[0])] + b",")


def test_generated_table_round_trip(tmp_path):
    dataset = load_dataset("transactions")
    split = dataset.test
    rows, x = split.rows[:200], split.x[:200]
    out = tmp_path / "adv.csv"
    y = split.y[:200]
    write_adversarial_csv(out, dataset, rows, x, x, y, y, torch.zeros(200, dtype=torch.bool))
    written = out.read_text().splitlines()
    source = dataset.table.text.iloc[rows]
    expected = source.to_csv(index=False, header=False, lineterminator="\n").splitlines()
    assert [line.rsplit(",", 3)[0] for line in written[1:]] == expected


def test_float_text_is_shortest_that_scales_back():
    z = np.float32((123.45 - 0.0) / 20000.0)
    assert float_text(0.0 + 20000.0 * float(z), float(z), 0.0, 20000.0) == "123.45"
    assert float_text(5.0, 0.5, 0.0, 10.0) == "5"
    assert float_text(-0.25, 0.375, -1.0, 2.0) == "-0.25"


def test_bad_arguments_are_one_line_errors(table_path, tmp_path):
    dataset = load(table_path)
    split = dataset.test
    out = tmp_path / "adv.csv"
    x, y, rows = split.x, split.y, split.rows
    with pytest.raises(DataError, match="arrays of lengths"):
        write_adversarial_csv(out, dataset, rows, x[:-1], x, y, y, y > 0)
    with pytest.raises(DataError, match="row position outside"):
        write_adversarial_csv(out, dataset, rows + 1000, x, x, y, y, y > 0)
    with pytest.raises(DataError, match="prediction outside"):
        write_adversarial_csv(out, dataset, rows, x, x, y + 5, y, y > 0)
    with pytest.raises(DataError, match="needs a dataset read from a table"):
        write_adversarial_csv(out, load_dataset("fraud"), rows, x, x, y, y, y > 0)
    assert not out.exists()
