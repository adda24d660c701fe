"""The FastAPI app: ``POST /predict``, ``GET /metrics``, ``GET /health``.

Every refusal is a JSON body ``{"error": "<one line>", "status": <code>}``: 400 for a body that
cannot be read (malformed JSON or CSV, an unreadable image), 401/403 for a missing/wrong bearer
token, 413 for a body or batch over the limits, 415 for an unsupported content type, 422 for
inputs of the wrong shape, NaN/inf or values outside the input bounds; bad input is never a 500.
A model call that raises is a 503 (counted in ``advtrain_model_errors_total``) and the server
goes on. The model runs in a worker thread, so a slow batch does not block ``/health``.

This module imports the ``serve`` extra (fastapi, prometheus-client) at its top: it is imported
only through :func:`advtrain.serving.create_app`, after the extra's check.
"""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING, Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from torch import nn

from ..util import one_line
from .inputs import InputError, InputSpec, parse_body
from .metrics import ServiceMetrics

if TYPE_CHECKING:
    from ..detection import Detector

#: Largest request body read, in bytes (a 256-image MNIST batch as JSON is about 2 MB).
DEFAULT_MAX_BODY = 8 * 1024 * 1024
ENDPOINTS = ("/predict", "/metrics", "/health")


class Predictor:
    """The model (and detector) on one batch: probabilities, classes, scores and flags."""

    def __init__(
        self, model: nn.Module, detector: Detector | None, classes: tuple[str, ...]
    ) -> None:
        self.model = model.eval()
        self.detector = None if detector is None else detector.eval()
        self.classes = classes
        self.device = next(iter(model.parameters()), torch.zeros(0)).device

    def __call__(self, x: torch.Tensor) -> dict[str, Any]:
        with torch.no_grad():
            x = x.to(self.device)
            if self.detector is not None:
                logits, scores = self.detector.logits_and_score(x)
            else:
                logits, scores = self.model(x), None
            probabilities = logits.float().softmax(dim=1).cpu()
        if probabilities.shape[0] != len(x) or not bool(torch.isfinite(probabilities).all()):
            raise RuntimeError("the model returned outputs of the wrong shape or non-finite ones")
        classes = probabilities.argmax(dim=1)
        out: dict[str, Any] = {
            "classes": classes.tolist(),
            "labels": [self._label(c) for c in classes.tolist()],
            "probabilities": probabilities.tolist(),
        }
        if self.detector is not None and scores is not None:
            scores = scores.float().cpu()
            out["scores"] = scores.tolist()
            out["flagged"] = self.detector.flagged(scores).tolist()
            out["threshold"] = self.detector.threshold
            out["detector"] = self.detector.kind
        return out

    def _label(self, c: int) -> str:
        return self.classes[c] if c < len(self.classes) else str(c)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON body of every refusal."""
    return JSONResponse(
        {"error": one_line(message, limit=300), "status": status}, status, headers=headers
    )


def create_app(
    model: nn.Module,
    spec: InputSpec,
    *,
    classes: tuple[str, ...] = (),
    detector: Detector | None = None,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    name: str = "model",
) -> FastAPI:
    """The service for ``model`` (and ``detector``), taking inputs as ``spec`` says; with
    ``token``, ``/predict`` and ``/metrics`` need ``Authorization: Bearer <token>``."""
    metrics = ServiceMetrics(
        score_buckets=() if detector is None else tuple(detector.clean_quantiles.values()),
        threshold=None if detector is None else detector.threshold,
    )
    predictor = Predictor(model, detector, classes)
    app = FastAPI(title="advtrain", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        path = request.url.path
        endpoint = path if path in ENDPOINTS else "other"
        response = await call_next(request)
        metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(InputError)
    async def refused(_: Request, exc: InputError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error(exc.status, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        ]
        return error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        return error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    def check_token(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise InputError(401, "a bearer token is required: Authorization: Bearer <token>")
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise InputError(403, "the bearer token is wrong")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": name,
            "detector": None if detector is None else detector.describe(),
            "input_shape": list(spec.shape),
            "classes": list(classes),
            "max_batch": spec.max_batch,
        }

    @app.get("/metrics")
    async def metrics_page(request: Request) -> Response:
        check_token(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        check_token(request)
        body = await read_body(request, max_body_bytes)
        x = await run_in_threadpool(parse_body, body, request.headers.get("content-type", ""), spec)
        try:
            result = await run_in_threadpool(predictor, x)
        except Exception as exc:  # the model's own failure: the service stays up
            metrics.model_errors.inc()
            return error(503, f"the model call failed: {type(exc).__name__}: {exc}")
        metrics.observe_predictions(
            torch.tensor(result["probabilities"]),
            torch.tensor(result["scores"]) if "scores" in result else None,
            torch.tensor(result["flagged"]) if "flagged" in result else None,
        )
        return JSONResponse(result)

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise InputError(413, f"the body of {int(declared)} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(413, f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
