"""A user's own table on the command line: train, evaluate, attack, trees, and the errors.

One small generated transactions table (2,000 rows, the example's schema) is trained on once for
the module; every command then runs in-process on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from advtrain.cli import run
from advtrain.data import TABLE_ENCODING_FILE, load_table
from advtrain.data.transactions import TRANSACTIONS_SCHEMA, transactions_frame

ROWS = 2000


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("table")
    csv, schema = folder / "tx.csv", folder / "tx.toml"
    transactions_frame(rows=ROWS, seed=7).to_csv(csv, index=False)
    schema.write_text(TRANSACTIONS_SCHEMA, encoding="utf-8")
    return csv, schema


@pytest.fixture(scope="module")
def run_dir(table, tmp_path_factory) -> Path:
    csv, schema = table
    out = tmp_path_factory.mktemp("run") / "run"
    torch.manual_seed(0)
    rc = run(
        ["train", "--data", str(csv), "--schema", str(schema), "--class-weight", "balanced",
         "--epochs", "1", "--eval-steps", "3", "--attack-steps", "3", "--out", str(out),
         "--quiet"]
    )  # fmt: skip
    assert rc == 0
    return out


def cli(capsys, *args: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = run([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_a_table_run_keeps_its_encoding_and_config(run_dir, table):
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"] == str(table[0]) and config["schema"] == str(table[1])
    assert config["class_weight"] == "balanced" and config["model"] == "mlp"
    encoding = json.loads((run_dir / TABLE_ENCODING_FILE).read_text())
    assert encoding["label"] == "fraud"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["select_by"] == "pr-auc"  # auto, on a table with a positive class


def test_evaluate_a_table_run_reports_the_positive_class_and_feasibility(run_dir, capsys, tmp_path):
    report = tmp_path / "r.json"
    rc, out, err = cli(
        capsys, "evaluate", run_dir, "--suite", "quick", "--attack-classes", "1",
        "--n", "400", "--json", report,
    )  # fmt: skip
    assert rc == 0, err
    assert "positive class 1 (clean -> attacked): recall" in out
    assert "recall at FPR 1.00%" in out
    d = json.loads(report.read_text())
    assert d["attack_classes"] == [1]
    assert d["feasibility"]["constraints"]["rules"][0] == "amount <= 40 * avg_amount_30d"
    assert d["feasibility"]["feasible_share"] in (None, 1.0)
    assert "dlr" in d["losses"]["skipped"]


def test_attack_writes_rows_in_the_users_columns(run_dir, table, capsys, tmp_path):
    out = tmp_path / "adv.csv"
    rc, _, err = cli(
        capsys, "attack", run_dir, "--attack", "apgd-ce", "--eps", "0.2", "--n", "300",
        "--attack-classes", "1", "--out", out, "--no-png",
    )  # fmt: skip
    assert rc == 0, err
    written = pd.read_csv(out, dtype=str, keep_default_na=False)
    original = pd.read_csv(table[0], dtype=str, keep_default_na=False)
    assert list(written.columns) == [*original.columns, "pred_clean", "pred_adv", "success"]
    assert len(written) == 300
    # the written rows read back as a table that satisfies every constraint of the schema
    back = tmp_path / "back.csv"
    written.drop(columns=["pred_clean", "pred_adv", "success"]).to_csv(back, index=False)
    encoding_json = json.loads((run_dir / TABLE_ENCODING_FILE).read_text())
    from advtrain.data import TableEncoding

    encoding = TableEncoding.from_json(encoding_json)
    data = load_table(back, None, encoding=encoding)
    constraints = data.info.constraints
    assert bool(constraints.feasible(data.test.x, data.test.x).all())
    # rows of legitimate transactions were not attacked: each is written back byte-identical to
    # its line in the input, followed by the three new columns
    lines = set(table[0].read_text().splitlines())
    out_lines = out.read_text().splitlines()[1:]
    legit = [i for i, label in enumerate(written["fraud"]) if label == "0"]
    assert legit
    for i in legit:
        assert out_lines[i].rsplit(",", 3)[0] in lines


def test_a_new_file_is_evaluated_with_the_runs_encoding(run_dir, table, capsys, tmp_path):
    frame = pd.read_csv(table[0], dtype=str, keep_default_na=False).iloc[:300]
    new = tmp_path / "new.csv"
    frame.to_csv(new, index=False)
    rc, out, err = cli(capsys, "evaluate", run_dir, "--data", new, "--suite", "pgd", "--steps", "3")
    assert rc == 0, err
    assert "n=300" in out
    frame.loc[0, "channel"] = "fax"
    frame.to_csv(new, index=False)
    rc, _, err = cli(capsys, "evaluate", run_dir, "--data", new, "--suite", "pgd")
    assert rc == 2 and "fax" in err and "channel" in err and "Traceback" not in err


def test_a_tree_model_is_evaluated_black_box(table, capsys, tmp_path):
    xgboost = pytest.importorskip("xgboost")
    csv, schema = table
    data = load_table(csv, schema, seed=0)
    model = xgboost.XGBClassifier(n_estimators=20, max_depth=3, random_state=0, n_jobs=1)
    model.fit(data.info.encoding.raw_numeric(data.train.x), data.train.y.numpy())
    path = tmp_path / "trees.json"
    model.save_model(path)
    report = tmp_path / "trees.json.report"
    rc, out, err = cli(
        capsys, "evaluate", "--model-file", path, "--data", csv, "--schema", schema,
        "--n", "200", "--json", report,
    )  # fmt: skip
    assert rc == 0, err
    assert "black-box" in out
    d = json.loads(report.read_text())
    assert d["settings"]["bound"] == "upper"
    assert d["robust_accuracy"] <= d["clean_accuracy"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{csv}"], "--schema"),
        (["--schema", "{schema}"], "--data"),
        (["--data", "{csv}", "--schema", "{schema}", "--dataset", "digits"], "not both"),
        (["--data", "{csv}", "--schema", "{bad}"], "tx_1h"),
        (["--model-file", "{pkl}", "--data", "{csv}", "--schema", "{schema}"], "pickle"),
    ],
)
def test_bad_table_input_is_one_line_and_exit_2(table, capsys, tmp_path, args, message):
    csv, schema = table
    bad = tmp_path / "bad.toml"
    bad.write_text(TRANSACTIONS_SCHEMA.replace('"tx_count_1h <= tx_count_24h"', '"tx_1h <= 2"'))
    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(b"not opened")
    paths = {"csv": csv, "schema": schema, "bad": bad, "pkl": pkl}
    filled = [a.format(**paths) for a in args]
    if "--model-file" not in filled:
        filled = ["--model", "mlp", "--weights", str(tmp_path / "w.safetensors"), *filled]
    rc, _, err = cli(capsys, "evaluate", *filled)
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message.lower() in err.lower()
