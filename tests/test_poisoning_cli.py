"""``advtrain backdoor`` and ``advtrain scan``: the matrix's JSON against its HTML page (and the
page as headless Chromium renders it), the suspects listed ranked, bad input as one line and
exit status 2."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

from advtrain.checkpoint import save_checkpoint
from advtrain.cli import run
from advtrain.data import load_dataset
from advtrain.poisoning.matrix import MatrixModels, MatrixSettings
from advtrain.poisoning.matrix_html import COLUMNS, format_value

from .test_report_html import _chromium, find_browser


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def call(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def matrix_dir(tmp_path_factory):
    """The matrix on digits: BadNets and clean-label against every defence, tiny settings."""
    out = tmp_path_factory.mktemp("backdoor") / "matrix"
    rc, stdout, err = call(
        "backdoor", "--dataset", "digits", "--attacks", "badnets,clean-label",
        "--defences", "none,spectral,ac,strip", "--rate", "0.03", "--epochs", "4",
        "--batch-size", "64", "--lr", "3e-3", "--strip-samples", "10", "--strip-inputs", "100",
        "--out", out, "--quiet",
    )  # fmt: skip
    assert rc == 0, err
    assert "matrix.json" in stdout
    return out


def metrics(page: str) -> dict[str, str]:
    """Every ``data-metric`` element's key and text."""
    found = re.findall(r'data-metric="([^"]+)"[^>]*>([^<]*)<', page)
    return dict(found)


def expected(matrix: dict) -> dict[str, str]:
    """Every figure of the JSON as the page must write it."""
    want = {
        "baseline/clean_accuracy": format_value(matrix["baseline"]["clean_accuracy"], "percent")
    }
    for name, asr in matrix["baseline"]["attack_success_rate"].items():
        want[f"baseline/{name}/attack_success_rate"] = format_value(asr, "percent")
    for cell in matrix["cells"]:
        for field, _, how in COLUMNS:
            want[f"{cell['attack']}/{cell['defence']}/{field}"] = format_value(cell[field], how)
    for key in ("rate", "target", "n_train", "n_test", "seconds"):
        want[key] = format_value(matrix[key], "number")
    return want


def assert_page_matches(page: str, matrix: dict) -> None:
    shown = metrics(page)
    for key, text in expected(matrix).items():
        assert shown.get(key) == text, key


def test_matrix_json_has_every_cell_and_the_page_every_figure(matrix_dir):
    matrix = json.loads((matrix_dir / "matrix.json").read_text())
    cells = {(c["attack"], c["defence"]) for c in matrix["cells"]}
    assert cells == {
        (a, d) for a in ("badnets", "clean-label") for d in ("none", "spectral", "ac", "strip")
    }
    for cell in matrix["cells"]:
        for field in ("clean_accuracy", "attack_success_rate", "robust_accuracy"):
            assert 0.0 <= cell[field] <= 1.0
        if cell["defence"] in ("spectral", "ac"):
            assert cell["poisoned"] == round(0.03 * matrix["n_train"])
    assert matrix["cell" if False else "cells"][0]["defence"] == "none"
    page = (matrix_dir / "matrix.html").read_text()
    assert_page_matches(page, matrix)
    # one picture per image trigger, embedded
    assert page.count('src="data:image/png;base64,') == 2
    assert all(
        t["picture"].startswith("data:image/png;base64,") for t in matrix["triggers"].values()
    )
    # the weights are kept for a rerun
    assert len(list((matrix_dir / "weights").glob("*.pt"))) == 1 + 2 * 3


def test_chromium_renders_the_matrix(matrix_dir, tmp_path):
    browser = find_browser()
    url = (matrix_dir / "matrix.html").resolve().as_uri()
    dom = _chromium(browser, tmp_path, "--dump-dom", url).stdout.decode("utf-8")
    assert_page_matches(dom, json.loads((matrix_dir / "matrix.json").read_text()))


def test_scan_lists_suspects_ranked(tmp_path):
    """A run directory written as ``advtrain train`` writes one (weights with their sidecar,
    config.json), around a model trained for a few epochs."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = load_dataset("digits")
    settings = MatrixSettings(epochs=3, batch_size=64, lr=3e-3)
    model = MatrixModels(data, "digits-cnn", settings, None, print).train(data.train, "run")
    meta = {"model": "digits-cnn", "norm": "linf", "eps": 0.2}
    save_checkpoint(run_dir / "model.safetensors", model.state_dict(), meta)
    (run_dir / "config.json").write_text(json.dumps({"dataset": "digits", "seed": 0}))
    target = tmp_path / "suspects.json"
    rc, out, err = call(
        "scan", "--model", run_dir, "--rate", "0.02", "--top", "5", "--json", target
    )
    assert rc == 0, err
    assert "spectral:" in out and "ac:" in out
    listed = json.loads(target.read_text())
    assert set(listed["defences"]) == {"spectral", "ac"}
    spectral = listed["defences"]["spectral"]
    assert spectral and all(a["score"] >= b["score"] for a, b in zip(spectral, spectral[1:]))
    assert out.count("score") == 5 + min(5, len(listed["defences"]["ac"]))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "digits", "--rate", "1.5"], "rate"),
        (["--dataset", "digits", "--attacks", "sleeper"], "unknown attack"),
        (["--dataset", "digits", "--defences", "none,magic"], "unknown defence"),
        (["--dataset", "digits", "--target", "10"], "target class"),
        (["--dataset", "transactions", "--attacks", "feature-trigger"], "STRIP"),
        (["--dataset", "transactions", "--defences", "none"], "image data"),
        (["--dataset", "digits", "--epochs", "0"], "epochs"),
        ([], "--dataset"),
    ],
)
def test_backdoor_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    rc, _, err = call("backdoor", *args, "--out", tmp_path / "out")
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_backdoor_out_is_a_file_and_scan_without_run(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    rc, _, err = call("backdoor", "--dataset", "digits", "--out", file)
    assert rc == 2 and "is a file" in err
    rc, _, err = call("scan", "--model", tmp_path / "missing")
    assert rc == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
