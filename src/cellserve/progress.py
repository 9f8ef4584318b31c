"""Progress bars for long commands (`ocr train`, `bench compress`, the rate sweeps of `bench serving` and
`bench streams`): rich bars on stderr, shown only when stderr is a terminal and --quiet is not given, so
logs, pipes and CI get the tables alone. Bars opened while one shows join its display (a training run
inside `bench compress` is a second line under the sweep's)."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

QUIET = False  # set by the command line's --quiet
_shown: Progress | None = None


def enabled() -> bool:
    return not QUIET and sys.stderr.isatty()


class Bar:
    """One task: advance by steps, or set `completed` (seconds of a time-bounded run); a note after the name."""

    def __init__(self, progress: Progress | None, task, description: str):
        self.progress, self.task, self.description = progress, task, description

    def advance(self, steps: float = 1, note: str | None = None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=steps, **self._described(note))

    def update(self, completed: float, note: str | None = None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=completed, **self._described(note))

    def grow(self, steps: float) -> None:
        """More steps than planned (a sweep refined near saturation)."""
        if self.progress is not None:
            total = self.progress.tasks[[t.id for t in self.progress.tasks].index(self.task)].total or 0
            self.progress.update(self.task, total=total + steps)

    def _described(self, note: str | None) -> dict:
        return {"description": f"{self.description}: {note}"} if note else {}


@contextmanager
def bar(description: str, total: float | None):
    """A bar for `total` steps (None: unknown); a silent one where bars are off."""
    global _shown
    if not enabled():
        yield Bar(None, None, description)
        return
    if _shown is not None:  # nested: a line in the open display
        task = _shown.add_task(description, total=total)
        try:
            yield Bar(_shown, task, description)
        finally:
            _shown.remove_task(task)
        return
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=Console(stderr=True))
    with progress:
        _shown = progress
        try:
            yield Bar(progress, progress.add_task(description, total=total), description)
        finally:
            _shown = None
