"""When attack loops read values back from the device (which makes the host wait for it).

On the CPU a read-back costs nothing, so loops drop their broken points at every step. On an
accelerator each read-back stalls the queue of kernels; there the loops run
:data:`ACCELERATOR_COMPACT_EVERY` steps without one. :func:`compact_every` imposes a schedule
whatever the device (the tests check the accelerator path on a CPU with it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import AdvtrainError

#: On an accelerator, attack loops drop the points already broken only every this many steps:
#: dropping them reads a count back to the host, which waits for the device to catch up.
ACCELERATOR_COMPACT_EVERY = 20
_compact_every: int | None = None


def compaction_interval(device: torch.device) -> int:
    """Every how many steps an attack loop drops its broken points: every step on the CPU (the
    count costs nothing there), every :data:`ACCELERATOR_COMPACT_EVERY` steps elsewhere, so
    that the steps in between run without host-device synchronisation. In between, broken
    points go on being attacked; a success, once found, is never replaced by a failure."""
    if _compact_every is not None:
        return _compact_every
    return 1 if device.type == "cpu" else ACCELERATOR_COMPACT_EVERY


@contextlib.contextmanager
def compact_every(steps: int) -> Iterator[None]:
    """Attack loops drop their broken points every ``steps`` steps whatever the device (to check
    the accelerator path on a CPU, or to tune it)."""
    global _compact_every
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise AdvtrainError(f"steps must be a positive integer, got {steps!r}")
    previous, _compact_every = _compact_every, steps
    try:
        yield
    finally:
        _compact_every = previous
