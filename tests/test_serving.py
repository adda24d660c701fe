"""The HTTP service (advtrain.serving, ``advtrain serve | monitor``) on a real socket: uvicorn on
127.0.0.1 at a free port, a tiny trained digits run shared by the module. Predictions equal the
library's, the token is enforced, every bad input gets its 4xx JSON (never a 500), a raising model
is a 503 after which the server still answers, and /metrics parses with the Prometheus text parser
and counts what was sent."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from advtrain.cli import run
from advtrain.cli.loading import load_model_and_data
from advtrain.detection import fit_detector, load_detector, save_detector
from advtrain.evaluation import predict
from advtrain.serving import InputSpec, create_app

TINY = ["--epochs", "1", "--eval-steps", "2", "--attack-steps", "3", "--quiet"]
TOKEN = "s3cret-token"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny digits run (advtrain train), its model and data, and a Mahalanobis detector saved
    beside it."""
    run_dir = tmp_path_factory.mktemp("serve") / "run"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert run(["train", *TINY, "--out", str(run_dir)]) == 0
    loaded = load_model_and_data(str(run_dir), None, None, None, None, None, None)
    model, data = loaded.model.eval(), loaded.data
    detector = fit_detector(
        "mahalanobis",
        model,
        data.train.x,
        data.train.y,
        data.val.x,
        threat=data.info.threat_model(),
    )
    path = save_detector(detector, run_dir / "detector-mahalanobis.safetensors")
    return run_dir, model, data, detector, path


def spec_of(data, max_batch: int = 16) -> InputSpec:
    info = data.info
    return InputSpec(info.shape, info.lower, info.upper, max_batch=max_batch, kind=info.kind)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """``app`` on uvicorn in a thread, on a real socket; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class Flaky(torch.nn.Module):
    """The model, raising while ``fail`` is set."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.fail = False

    def forward(self, x):
        if self.fail:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.model(x)


@pytest.fixture(scope="module")
def service(trained):
    """The model with its detector, behind a token, at most 16 inputs and 64 kB a request."""
    _, model, data, detector, _ = trained
    app = create_app(
        model,
        spec_of(data),
        classes=data.info.classes,
        detector=detector,
        token=TOKEN,
        max_body_bytes=64 * 1024,
    )
    with serving(app) as url:
        yield url


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_predictions_equal_the_librarys(service, trained):
    _, model, data, detector, _ = trained
    x = data.test.x[:10]
    answer = requests.post(f"{service}/predict", json={"inputs": x.tolist()}, headers=auth())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["classes"] == predict(model, x).tolist()
    with torch.no_grad():
        probabilities = model(x).softmax(dim=1)
    torch.testing.assert_close(torch.tensor(body["probabilities"]), probabilities)
    scores = detector.scores(x)
    torch.testing.assert_close(torch.tensor(body["scores"]), scores)
    assert body["flagged"] == detector.flagged(scores).tolist()
    assert body["threshold"] == detector.threshold and body["detector"] == "mahalanobis"
    assert body["labels"] == [data.info.classes[c] for c in body["classes"]]
    flat = requests.post(
        f"{service}/predict", json={"inputs": x.reshape(10, -1).tolist()}, headers=auth()
    )
    assert flat.json()["classes"] == body["classes"]  # the same numbers flat


def test_csv_rows_and_an_image_upload(service, trained):
    _, model, data, _, _ = trained
    x = data.test.x[:3]
    csv = "\n".join(",".join(f"{v:.9g}" for v in row) for row in x.reshape(3, -1).tolist())
    answer = requests.post(
        f"{service}/predict", data=csv, headers={**auth(), "Content-Type": "text/csv"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["classes"] == predict(model, x).tolist()
    pixels = (x[0, 0] * 255).round().to(torch.uint8).numpy()
    png = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(png, format="PNG")
    image = requests.post(
        f"{service}/predict", data=png.getvalue(), headers={**auth(), "Content-Type": "image/png"}
    )
    assert image.status_code == 200, image.text
    assert (
        image.json()["classes"]
        == predict(model, torch.tensor(pixels / 255.0)[None, None].float()).tolist()
    )


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer wrong"}, 403), ({"Authorization": "Basic x"}, 401)],
)
def test_the_token_is_enforced(service, headers, status):
    for answer in (
        requests.post(f"{service}/predict", json={"inputs": [[[[0.0] * 8] * 8]]}, headers=headers),
        requests.get(f"{service}/metrics", headers=headers),
    ):
        assert answer.status_code == status
        assert "token" in answer.json()["error"]
    assert requests.get(f"{service}/health").status_code == 200  # open to load balancers


ONE = [[[0.5] * 8] * 8]
BAD_INPUTS = [
    ("malformed json", b'{"inputs": [1, 2', "application/json", 400, "malformed JSON"),
    ("not an object", b"[1, 2]", "application/json", 422, '"inputs"'),
    ("inputs missing", b'{"x": []}', "application/json", 422, '"inputs"'),
    ("inputs not a list", b'{"inputs": 3}', "application/json", 422, "list"),
    ("empty batch", b'{"inputs": []}', "application/json", 422, "empty"),
    ("batch too large", json.dumps({"inputs": [ONE] * 17}).encode(), "application/json", 413, "17"),
    ("body too large", b'{"inputs": [' + b" " * 70_000 + b"]}", "application/json", 413, "limit"),
    (
        "wrong shape",
        json.dumps({"inputs": [[1.0, 2.0]]}).encode(),
        "application/json",
        422,
        "shape",
    ),
    (
        "ragged",
        json.dumps({"inputs": [[[0.1] * 8] * 7 + [[0.1] * 3]]}).encode(),
        "application/json",
        422,
        "ragged",
    ),
    (
        "strings",
        json.dumps({"inputs": [[["a"] * 8] * 8]}).encode(),
        "application/json",
        422,
        "not numbers",
    ),
    (
        "nan",
        b'{"inputs": [' + json.dumps(ONE).replace("0.5", "NaN", 1).encode() + b"]}",
        "application/json",
        422,
        "NaN",
    ),
    (
        "infinity",
        b'{"inputs": [' + json.dumps(ONE).replace("0.5", "Infinity", 1).encode() + b"]}",
        "application/json",
        422,
        "infinite",
    ),
    (
        "out of bounds",
        json.dumps({"inputs": [[[[255.0] * 8] * 8]]}).encode(),
        "application/json",
        422,
        "bounds",
    ),
    ("content type", b"hello", "application/xml", 415, "content type"),
    ("csv width", b"0.1,0.2\n", "text/csv", 422, "64 numbers"),
    ("csv text", b"a,b\n", "text/csv", 422, "numbers"),
    ("broken image", b"\x89PNG not really", "image/png", 400, "image"),
]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "needle"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_every_bad_input_gets_its_4xx_json(service, body, content_type, status, needle):
    answer = requests.post(
        f"{service}/predict", data=body, headers={**auth(), "Content-Type": content_type}
    )
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert error["status"] == status and needle in error["error"]
    assert "\n" not in error["error"]


def test_unknown_paths_and_methods_are_json(service):
    assert requests.get(f"{service}/nowhere").json() == {"error": "Not Found", "status": 404}
    assert requests.get(f"{service}/predict", headers=auth()).status_code == 405


def test_a_raising_model_is_a_503_and_the_server_stays_up(trained):
    _, model, data, _, _ = trained
    flaky = Flaky(model)
    app = create_app(flaky, spec_of(data), classes=data.info.classes)
    with serving(app) as url:
        x = {"inputs": data.test.x[:2].tolist()}
        flaky.fail = True
        failed = requests.post(f"{url}/predict", json=x)
        assert failed.status_code == 503
        assert "CUDA out of memory" in failed.json()["error"]
        assert requests.get(f"{url}/health").json()["status"] == "ok"
        flaky.fail = False
        assert requests.post(f"{url}/predict", json=x).status_code == 200
        metrics = scrape(url)
        assert metrics[("advtrain_model_errors_total", ())] == 1


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics by (name, sorted labels), read by the Prometheus text parser."""
    text = requests.get(f"{url}/metrics", headers=headers).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_parse_and_count_what_was_sent(trained):
    _, model, data, detector, _ = trained
    app = create_app(model, spec_of(data), classes=data.info.classes, detector=detector)
    with serving(app) as url:
        sizes = [1, 3, 5]
        for n in sizes:
            assert requests.post(f"{url}/predict", json={"inputs": data.test.x[:n].tolist()}).ok
        for _ in range(2):
            requests.post(f"{url}/predict", data=b"{", headers={"Content-Type": "application/json"})
        requests.get(f"{url}/health")
        got = scrape(url)
        assert got[("advtrain_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 3
        assert got[("advtrain_requests_total", (("endpoint", "/predict"), ("status", "400")))] == 2
        assert got[("advtrain_requests_total", (("endpoint", "/health"), ("status", "200")))] == 1
        assert got[("advtrain_request_latency_seconds_count", (("endpoint", "/predict"),))] == 5
        assert got[("advtrain_inputs_total", ())] == sum(sizes)
        assert got[("advtrain_confidence_count", ())] == sum(sizes)
        assert got[("advtrain_detector_score_count", ())] == sum(sizes)
        flagged = detector.flagged(detector.scores(data.test.x[:5]))
        expected = int(flagged[:1].sum() + flagged[:3].sum() + flagged[:5].sum())
        assert got[("advtrain_flagged_total", ())] == expected
        assert got[("advtrain_flagged_share", ())] == pytest.approx(expected / sum(sizes))
        assert got[("advtrain_detector_threshold", ())] == pytest.approx(detector.threshold)
        counted = sum(v for (name, _), v in got.items() if name == "advtrain_predictions_total")
        assert counted == sum(sizes)
        again = scrape(url)  # the first scrape is counted by the second
        assert (
            again[("advtrain_requests_total", (("endpoint", "/metrics"), ("status", "200")))] == 1
        )


def test_serve_and_monitor_commands(trained, monkeypatch, capsys):
    """``advtrain serve RUN --detector PATH`` (the token from ADVTRAIN_TOKEN) with its app on a
    real socket: ``uvicorn.run`` is replaced by a server in a thread, so the command returns;
    then ``advtrain monitor URL --count 1`` against it."""
    run_dir, model, data, detector, path = trained
    started: list[tuple[uvicorn.Server, threading.Thread]] = []

    def run_in_thread(app, host, port, **_):
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.01)
        started.append((server, thread))

    monkeypatch.setattr(uvicorn, "run", run_in_thread)
    monkeypatch.setenv("ADVTRAIN_TOKEN", TOKEN)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    capsys.readouterr()
    try:
        assert run(["serve", str(run_dir), "--port", str(port), "--detector", str(path)]) == 0
        said = capsys.readouterr().out
        assert f"on {url}" in said and "token is required" in said and TOKEN not in said
        x = data.test.x[:4]
        assert requests.post(f"{url}/predict", json={"inputs": x.tolist()}).status_code == 401
        body = requests.post(f"{url}/predict", json={"inputs": x.tolist()}, headers=auth()).json()
        assert body["classes"] == predict(model, x).tolist()
        torch.testing.assert_close(torch.tensor(body["scores"]), detector.scores(x))
        assert run(["monitor", url, "--count", "1"]) == 0  # the token from ADVTRAIN_TOKEN
        shown = capsys.readouterr().out
        assert "flagged share" in shown and "status 200" in shown and "status 401" in shown
        monkeypatch.delenv("ADVTRAIN_TOKEN")
        assert run(["monitor", url, "--count", "1"]) == 2
        assert "401" in capsys.readouterr().err
    finally:
        for server, thread in started:
            server.should_exit = True
            thread.join(10)


def test_serve_without_the_extra_fails_with_one_line(trained, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a)
    )
    capsys.readouterr()
    assert run(["serve", str(trained[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "serve extra" in err and "uvicorn" in err


def test_serve_refuses_a_corrupt_detector(trained, tmp_path, capsys):
    run_dir, *_, path = trained
    broken = tmp_path / "d.safetensors"
    broken.write_bytes(Path(path).read_bytes()[:50])
    (tmp_path / "d.json").write_text(Path(path).with_suffix(".json").read_text())
    capsys.readouterr()
    assert run(["serve", str(run_dir), "--detector", str(broken)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_evaluate_refuses_a_detector_with_the_pgd_suite(trained, tmp_path, capsys):
    """``advtrain evaluate --detector`` goes with the suites (their examples are the detector's
    non-adaptive positives); a detector to save into a missing directory fails before any work."""
    run_dir, *_, path = trained
    capsys.readouterr()
    assert run(["evaluate", str(run_dir), "--suite", "pgd", "--detector", str(path)]) == 2
    assert "quick, standard and thorough" in capsys.readouterr().err
    target = tmp_path / "missing" / "d.safetensors"
    args = ["evaluate", str(run_dir), "--fit-detector", "mahalanobis", "--detector", str(target)]
    assert run(args) == 2
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_fits_saves_and_measures_a_detector(trained, tmp_path, capsys):
    """``advtrain evaluate RUN --fit-detector KIND --detector PATH``: the detector is fitted,
    saved where told, and measured against the suite's examples and the adaptive attack; the
    JSON report carries both, with Tramèr's reduction, and the saved file loads back."""
    run_dir, model, *_ = trained
    saved, report = tmp_path / "d.safetensors", tmp_path / "report.json"
    common = ["evaluate", str(run_dir), "--suite", "quick", "--n", "8", "--json", str(report)]
    capsys.readouterr()
    assert run([*common, "--fit-detector", "mahalanobis", "--detector", str(saved)]) == 0
    assert "detector mahalanobis" in capsys.readouterr().out
    assert saved.exists()
    figures = json.loads(report.read_text())["detector"]
    assert figures["kind"] == "mahalanobis" and figures["n"] == 8
    for side in ("adaptive", "non_adaptive"):
        assert set(figures[side]["tpr_at_fpr"]) >= {"1%", "5%"}
        assert 0.0 <= figures[side]["pair_robust_accuracy"] <= 1.0
    assert "Tramèr" in figures["reduction"] and "eps=0.1" in figures["reduction"]
    assert load_detector(saved, model).threshold == figures["threshold"]
