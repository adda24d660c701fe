"""Printing, and several processes: ``--nproc`` starts the command again under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import click


def echo(line: str) -> None:
    """One line on standard output."""
    click.echo(line)


def silent(line: str) -> None:
    """Print nothing (ranks other than 0 leave the speaking to rank 0)."""


def speaker(rank: int) -> Callable[[str], None]:
    """:func:`echo` on rank 0, :func:`silent` on the others."""
    return echo if rank == 0 else silent


def leave_process_group() -> None:
    """The end of a command under torchrun: leave the group together, then exit at once. (The
    interpreter's own teardown of torch's distributed objects has been seen to abort the
    process now and then, after all the work was done and written.)"""
    from ..distributed import env_world_size, shutdown

    if env_world_size() == 1:
        return
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torchrun(command: str, nproc: int) -> int:
    """Run this ``advtrain COMMAND`` again under torchrun with ``nproc`` processes (after
    ``--``, so that torchrun's own option parser leaves ours alone: ``--n`` is ambiguous to it)."""
    args, skip = [], False
    for arg in sys.argv[2:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    line = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "--",
        "advtrain",
        command,
        *args,
    ]
    return subprocess.run(line, check=False).returncode
