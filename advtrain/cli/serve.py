"""``advtrain serve | monitor``: a run's model behind an HTTP API with adversarial-input
detection and Prometheus metrics, and a live view of those metrics.

The detector is fitted (and measured) by ``advtrain evaluate RUN --fit-detector KIND``, which
saves it beside the run: fitting a detector without measuring it against an adaptive attack is
how published detectors misled their readers, so the command that fits is the one that measures.
"""

from __future__ import annotations

import click

from .processes import echo


@click.command(name="serve")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--detector",
    "detector_path",
    type=click.Path(dir_okay=False),
    help="A fitted detector file (advtrain evaluate RUN --fit-detector KIND writes one): "
    "each prediction then carries its score and flag.",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--token",
    envvar="ADVTRAIN_TOKEN",
    help="Require Authorization: Bearer TOKEN on /predict and /metrics (or ADVTRAIN_TOKEN).",
)
@click.option("--max-batch", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--max-body-mb",
    type=click.FloatRange(min=0.001),
    default=8.0,
    show_default=True,
    help="Largest request body, in MB.",
)
@click.option("--data-dir", help="Directory of data files (default: the run's).")
@click.option("--device", default="cpu", show_default=True)
def serve(
    run_dir: str,
    detector_path: str | None,
    host: str,
    port: int,
    token: str | None,
    max_batch: int,
    max_body_mb: float,
    data_dir: str | None,
    device: str,
) -> None:
    """Serve the model of RUN_DIR: POST /predict, GET /metrics (Prometheus), GET /health."""
    from ..serving import InputSpec, create_app, require_serve_extra, run_server
    from ..util import resolve_device
    from .loading import load_model_and_data

    require_serve_extra()
    loaded = load_model_and_data(run_dir, None, None, None, None, data_dir, None)
    info = loaded.data.info
    model = loaded.model.to(resolve_device(device)).eval()
    detector = None
    if detector_path is not None:
        import torch

        from ..detection import load_detector

        probe = torch.zeros(2, *info.shape) + torch.as_tensor(info.lower)
        detector = load_detector(detector_path, model, probe=probe)
    spec = InputSpec(
        shape=tuple(info.shape),
        lower=info.lower,
        upper=info.upper,
        max_batch=max_batch,
        kind=info.kind,
        encoding=info.encoding,
    )
    app = create_app(
        model,
        spec,
        classes=tuple(info.classes),
        detector=detector,
        token=token or None,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        name=loaded.source,
    )
    echo(
        f"serving {loaded.source} on http://{host}:{port} (POST /predict, GET /metrics, "
        f"GET /health){'; a bearer token is required' if token else ''}"
        + (f"; detector {detector.describe()}" if detector is not None else "")
    )
    run_server(app, host, port)


@click.command(name="monitor")
@click.argument("url")
@click.option("--token", envvar="ADVTRAIN_TOKEN", help="The service's bearer token.")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds per poll.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many polls.")
def monitor(url: str, token: str | None, interval: float, count: int | None) -> None:
    """Poll URL/metrics of an advtrain service and show the live figures."""
    from ..serving import require_serve_extra
    from ..serving.monitor import watch

    require_serve_extra()
    watch(url, token=token, interval=interval, count=count)
