"""A bounded load test of ``advtrain serve``'s app on 127.0.0.1: throughput, p50/p99 latency and
errors, without and with a detector, then with malformed requests mixed in.

The server runs in its own process (this script with ``--serve``): uvicorn, one worker, the
released ``pgd_madry.pth`` MNIST model of Wong, Rice & Kolter (``../shared/models``) in
advtrain's ``mnist-small``, torch on one thread per request, and for the detector phases a
Mahalanobis detector fitted on 5,000 training images (threshold at 5% FPR on the validation
split). The client is this process: ``--clients`` threads, each with its own ``requests``
session, sending ``--requests`` POST /predict in all (one MNIST test image each, as JSON,
serialised beforehand), then it stops. Each server first answers ``--warmup`` requests that are
not counted (the first passes of a fresh process are slower).

Phases: (1) no detector, (2) with the detector, (3) with the detector and ``--bad`` of the
requests malformed (broken JSON, NaN, a wrong shape, pixels in 0-255, a batch over the limit, a
wrong content type, picked at random): every good request must be a 200, every bad one a 4xx,
none a 5xx, and /health must answer afterwards.

Usage::

    .venv/bin/python bench/serve_load.py                  # 2,000 requests, 8 clients
    .venv/bin/python bench/serve_load.py --requests 200   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ADVTRAIN_SHARED", ROOT.parent / "shared"))
MNIST_DIR = SHARED / "data" / "mnist"
WEIGHTS = SHARED / "models" / "fast-adversarial-mnist" / "pgd_madry.pth"
sys.path.insert(0, str(ROOT))

MAX_BATCH = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per phase (2000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    parser.add_argument("--warmup", type=int, default=200, help="uncounted requests first")
    parser.add_argument("--bad", type=float, default=0.1, help="malformed share in phase 3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--detector", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- the server process


def serve(port: int, with_detector: bool) -> None:
    """The app on uvicorn at 127.0.0.1:``port`` (this process, until terminated)."""
    import torch

    torch.set_num_threads(1)
    from advtrain.checkpoint import load_weights_into
    from advtrain.data import load_dataset
    from advtrain.detection import fit_detector
    from advtrain.models import build_model
    from advtrain.serving import InputSpec, create_app, run_server

    data = load_dataset("mnist", data_dir=MNIST_DIR, download=False)
    model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
    load_weights_into(model, WEIGHTS)
    model.eval()
    detector = None
    if with_detector:
        detector = fit_detector(
            "mahalanobis",
            model,
            data.train.x[:5000],
            data.train.y[:5000],
            data.val.x,
            threat=data.info.threat_model(),
        )
    spec = InputSpec((1, 28, 28), 0.0, 1.0, max_batch=MAX_BATCH)
    app = create_app(model, spec, classes=data.info.classes, detector=detector)
    run_server(app, "127.0.0.1", port, log_level="error")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """This script with ``--serve PORT`` in a child process, ready when /health answers."""

    def __init__(self, with_detector: bool) -> None:
        import requests

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, __file__, "--serve", str(self.port)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            command + (["--detector"] if with_detector else []), env=env
        )
        deadline = time.monotonic() + 180
        while True:
            if self.process.poll() is not None:
                raise SystemExit("the server process ended before it answered")
            try:
                if requests.get(f"{self.url}/health", timeout=1).ok:
                    return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit("the server did not answer /health within 180 s")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


# ---------------------------------------------------------------------- the clients


def good_bodies(n: int) -> list[bytes]:
    from advtrain.data import load_dataset

    data = load_dataset("mnist", data_dir=MNIST_DIR, download=False)
    return [json.dumps({"inputs": [x.tolist()]}).encode() for x in data.test.x[:n]]


def bad_bodies() -> list[tuple[str, bytes, str]]:
    """(what, body, content type) of malformed requests."""
    image = [[[0.5] * 28] * 28]
    nan = json.dumps({"inputs": [image]}).replace("0.5", "NaN", 1)
    return [
        ("broken json", b'{"inputs": [[[0.1, 0.2', "application/json"),
        ("nan", nan.encode(), "application/json"),
        ("wrong shape", json.dumps({"inputs": [[0.5] * 10]}).encode(), "application/json"),
        (
            "0-255 pixels",
            json.dumps({"inputs": [[[[200.0] * 28] * 28]]}).encode(),
            "application/json",
        ),
        (
            "batch too large",
            json.dumps({"inputs": [image] * (MAX_BATCH + 1)}).encode(),
            "application/json",
        ),
        ("content type", b"<inputs/>", "application/xml"),
    ]


def load(
    url: str, n: int, clients: int, bodies: list[bytes], bad_share: float, seed: int
) -> dict[str, object]:
    """``n`` POST /predict from ``clients`` threads; latencies and status counts."""
    import requests

    rng = random.Random(seed)
    bad = bad_bodies()
    plan = []
    for i in range(n):
        if rng.random() < bad_share:
            what, body, kind = rng.choice(bad)
            plan.append((False, what, body, kind))
        else:
            plan.append((True, "good", bodies[i % len(bodies)], "application/json"))
    lock = threading.Lock()
    cursor = iter(range(n))
    latencies: list[float] = []
    statuses: Counter[tuple[bool, int]] = Counter()
    failures: Counter[str] = Counter()

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            good, _what, body, kind = plan[i]
            start = time.perf_counter()
            try:
                answer = session.post(
                    f"{url}/predict", data=body, headers={"Content-Type": kind}, timeout=30
                )
                status = answer.status_code
            except requests.RequestException as exc:
                status = -1
                with lock:
                    failures[type(exc).__name__] += 1
            seconds = time.perf_counter() - start
            with lock:
                statuses[(good, status)] += 1
                if good:
                    latencies.append(seconds)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()

    def quantile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    good_errors = sum(c for (good, s), c in statuses.items() if good and s != 200)
    bad_not_4xx = sum(c for (good, s), c in statuses.items() if not good and not 400 <= s < 500)
    return {
        "requests": n,
        "seconds": wall,
        "throughput": n / wall,
        "p50_ms": 1000 * quantile(0.5),
        "p99_ms": 1000 * quantile(0.99),
        "good_errors": good_errors,
        "bad": sum(c for (good, _), c in statuses.items() if not good),
        "bad_not_4xx": bad_not_4xx,
        "5xx": sum(c for (_, s), c in statuses.items() if s >= 500),
        "statuses": {f"{'good' if g else 'bad'} {s}": c for (g, s), c in sorted(statuses.items())},
        "client_failures": dict(failures),
    }


def say(phase: str, r: dict[str, object]) -> None:
    print(
        f"{phase:<34} {r['throughput']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  "
        f"p99 {r['p99_ms']:6.1f} ms  good-request errors {r['good_errors']}  "
        f"malformed {r['bad']} (not 4xx: {r['bad_not_4xx']})  5xx {r['5xx']}  "
        f"({r['seconds']:.1f} s; load average {os.getloadavg()[0]:.1f})"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.detector)
        return
    import requests

    bodies = good_bodies(200)
    print(
        f"{args.requests} POST /predict per phase (one MNIST image each), {args.clients} "
        f"concurrent clients, server: one uvicorn worker on 127.0.0.1, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    results = {}
    server = Server(with_detector=False)
    try:
        load(server.url, args.warmup, args.clients, bodies, 0.0, args.seed)  # not counted
        results["plain"] = load(server.url, args.requests, args.clients, bodies, 0.0, args.seed)
    finally:
        server.stop()
    say("no detector", results["plain"])
    server = Server(with_detector=True)
    try:
        load(server.url, args.warmup, args.clients, bodies, 0.0, args.seed)  # not counted
        results["detector"] = load(server.url, args.requests, args.clients, bodies, 0.0, args.seed)
        say("mahalanobis detector", results["detector"])
        results["mixed"] = load(
            server.url, args.requests, args.clients, bodies, args.bad, args.seed + 1
        )
        say(f"detector, {args.bad:.0%} malformed mixed in", results["mixed"])
        alive = requests.get(f"{server.url}/health", timeout=5).json()["status"] == "ok"
        print(f"server alive after the malformed requests: {alive}")
        print(f"statuses with malformed requests: {results['mixed']['statuses']}")
    finally:
        server.stop()
    ok = (
        all(r["good_errors"] == 0 and r["5xx"] == 0 for r in results.values())
        and results["mixed"]["bad_not_4xx"] == 0
        and alive
    )
    print("PASS" if ok else "FAIL")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
