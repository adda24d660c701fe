"""The per-epoch progress bar of a training run (rich, on standard error, only on a terminal)."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

#: The training bar shows the running loss and accuracy every this many batches.
BAR_REFRESH = 10

#: Advance the bar by one batch; its argument gives the status text when it is shown.
Advance = Callable[[Callable[[], str]], None]


class EpochBar:
    """A rich progress bar, or nothing, used as ``with EpochBar(...) as advance: advance(text)``.

    ``text`` is a function, called for every :data:`BAR_REFRESH`-th batch and the last one only:
    its figures are read back from the device, which makes the host wait for it.
    """

    def __init__(self, enabled: bool, label: str, total: int, completed: int = 0) -> None:
        self.enabled, self.label, self.total, self.completed = enabled, label, total, completed
        self.progress: Progress | None = None

    def __enter__(self) -> Advance:
        console = Console(stderr=True)
        if not self.enabled or not console.is_terminal:
            return lambda text: None
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            transient=True,
            console=console,
        )
        self.progress.start()
        task = self.progress.add_task(
            self.label, total=self.total, completed=self.completed, status=""
        )
        progress, count = self.progress, [self.completed]

        def advance(text: Callable[[], str]) -> None:
            count[0] += 1
            if count[0] % BAR_REFRESH == 0 or count[0] == self.total:
                progress.update(task, advance=1, status=text())
            else:
                progress.update(task, advance=1)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
