"""``advtrain backdoor | scan``: placeholder until issue 26 (poisoned training data) lands."""

from __future__ import annotations

import click

from ..errors import AdvtrainError


@click.command(name="backdoor")
def backdoor() -> None:
    """Not available yet (issue 26)."""
    raise AdvtrainError("advtrain backdoor is not available yet")


@click.command(name="scan")
def scan() -> None:
    """Not available yet (issue 26)."""
    raise AdvtrainError("advtrain scan is not available yet")
