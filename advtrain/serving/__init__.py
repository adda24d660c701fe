"""The model as an HTTP service, with adversarial-input detection and Prometheus metrics.

``advtrain serve RUN_DIR [--detector PATH]`` runs :func:`create_app` on uvicorn: ``POST /predict``
(a JSON batch, CSV rows or an image) answers classes, probabilities and, with a detector, its
score and flag per input; ``GET /metrics`` is the Prometheus text (requests, latency, flagged
share, score and confidence histograms); ``GET /health``. ``advtrain monitor URL`` polls the
metrics and shows the live figures (:mod:`.monitor`).

The web stack (fastapi, uvicorn, prometheus-client) is the ``serve`` extra; it is imported only
when a service is built, so ``import advtrain`` never needs it, and without it
:func:`require_serve_extra` fails with one line naming the extra.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from ..errors import AdvtrainError
from .inputs import InputError, InputSpec, check_batch, parse_body

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = [
    "SERVE_EXTRA",
    "InputError",
    "InputSpec",
    "check_batch",
    "create_app",
    "parse_body",
    "require_serve_extra",
    "run_server",
]

#: The modules of the ``serve`` extra.
SERVE_EXTRA = ("fastapi", "uvicorn", "prometheus_client")


def require_serve_extra() -> None:
    """Fail with one line naming the ``serve`` extra when any of its modules is missing."""
    missing = [name for name in SERVE_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise AdvtrainError(
            f"serving needs the serve extra (missing: {', '.join(missing)}): "
            "pip install 'advtrain[serve]'"
        )


def create_app(*args: Any, **kwargs: Any) -> FastAPI:
    """:func:`advtrain.serving.app.create_app` (imported on first use)."""
    require_serve_extra()
    from .app import create_app as build

    return build(*args, **kwargs)


def run_server(app: FastAPI, host: str, port: int, log_level: str = "warning") -> None:
    """Serve ``app`` with uvicorn on ``host:port`` until interrupted; a port that cannot be
    bound is a one-line error."""
    require_serve_extra()
    import uvicorn

    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        raise AdvtrainError(f"cannot serve on {host}:{port} (in use or not allowed)") from exc
