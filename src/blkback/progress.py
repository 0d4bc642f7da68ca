"""Progress bars for long commands (``repro``, ``sim``), drawn by ``rich`` on stderr.

A bar is drawn only when stderr is a terminal; in a pipe or a log file it disappears and
only what the command prints as results remains. While a bar is shown, rich draws lines
written to stdout and stderr above it, so the command's own output stays readable.
"""

from __future__ import annotations

import atexit

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def stderr_console() -> Console:
    """A console on stderr (rich decides colour and width from the terminal)."""
    return Console(stderr=True)


class _Bar:
    """One rich progress bar with one task, started on first use, stopped when complete
    (or at exit, so that an interrupted command gives the terminal its cursor back)."""

    def __init__(self, label: str, unit: str, *, enabled: bool = True) -> None:
        self.label = label
        self.unit = unit
        self.console = stderr_console()
        self.enabled = enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def _ensure(self, total: int) -> tuple[Progress, TaskID]:
        if self._progress is None or self._task is None:
            self._progress = Progress(
                TextColumn("[bold]{task.fields[label]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                console=self.console,
                refresh_per_second=2,
            )
            self._task = self._progress.add_task("", total=total, label=self.label)
            self._progress.start()
            atexit.register(self.close)
        return self._progress, self._task

    def update(self, done: int, total: int, what: str | None = None) -> None:
        if not self.enabled:
            return
        progress, task = self._ensure(total)
        if what is None:
            progress.update(task, completed=done, total=total)
        else:
            progress.update(task, completed=done, total=total, description=what)
        if done >= total:
            self.close()

    def close(self) -> None:
        """Stop drawing (the finished bar stays on the terminal)."""
        if self._progress is not None:
            self._progress.stop()
            atexit.unregister(self.close)
        self._progress = None
        self._task = None


class HostProgress:
    """``progress(done, total)`` for simulated hosts (``sim``'s runners call it per host)."""

    def __init__(self, label: str, *, enabled: bool = True) -> None:
        self._bar = _Bar(label, "hosts", enabled=enabled)

    def __call__(self, done: int, total: int) -> None:
        self._bar.update(done, total)


class StepProgress:
    """A fixed number of steps, each announced when it starts (``repro``'s runs).

    ``advance(result)`` ends a step; its one-line result is printed to stderr whether or not
    the bar is shown, since it is a result and not progress.
    """

    def __init__(self, total: int, label: str) -> None:
        self.total = max(1, total)
        self.done = 0
        self._bar = _Bar(label, "steps")

    def step(self, what: str) -> None:
        """Announce the step that starts now."""
        self._bar.update(self.done, self.total, what)

    def advance(self, result: str = "") -> None:
        """The current step is done."""
        self.done += 1
        if result:
            self._bar.console.print(result, markup=False, highlight=False, soft_wrap=True)
        self._bar.update(self.done, self.total, "")
