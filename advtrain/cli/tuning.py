"""``advtrain sweep | check``: placeholder until issue 28 (sweep and check) lands."""

from __future__ import annotations

import click

from ..errors import AdvtrainError


@click.command(name="sweep")
def sweep() -> None:
    """Not available yet (issue 28)."""
    raise AdvtrainError("advtrain sweep is not available yet")


@click.command(name="check")
def check() -> None:
    """Not available yet (issue 28)."""
    raise AdvtrainError("advtrain check is not available yet")
