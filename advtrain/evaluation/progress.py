"""A progress bar for the cascade: which attack, which chunk, how many points still stand.

:func:`terminal_progress` gives the callback a :class:`.cascade.Cascade` calls at every chunk
(``progress(step, chunks done, chunks, points standing)``), drawn with rich on standard error
when it is a terminal, and nothing otherwise (a log file or CI gets no control characters).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

#: ``progress(step, chunks done, chunks, points standing)``, called as a cascade goes.
Progress = Callable[[str, int, int, int], None]


@contextlib.contextmanager
def terminal_progress(enabled: bool | None = None) -> Iterator[Progress | None]:
    """A progress callback drawing one bar per attack (``enabled`` None: when standard error is
    a terminal), or None."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    bar = Bar(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("chunks · {task.fields[standing]} standing"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(step: str, done: int, total: int, standing: int) -> None:
        if step not in tasks:
            tasks[step] = bar.add_task(step, total=max(total, 1), standing=standing)
        bar.update(tasks[step], completed=done, standing=standing)

    with bar:
        yield update
