"""``advtrain serve | monitor``: placeholder until issue 27 (serving and monitoring) lands."""

from __future__ import annotations

import click

from ..errors import AdvtrainError


@click.command(name="serve")
def serve() -> None:
    """Not available yet (issue 27)."""
    raise AdvtrainError("advtrain serve is not available yet")


@click.command(name="monitor")
def monitor() -> None:
    """Not available yet (issue 27)."""
    raise AdvtrainError("advtrain monitor is not available yet")
