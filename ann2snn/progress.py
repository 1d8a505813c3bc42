"""Progress of long steps, and notes. The library reports (``task``, ``notify``); the front end
chooses how it is shown (``install``, ``install_notes``): nothing by default, so the Python API
and tests stay silent. The CLI shows a bar on stderr when stderr is a terminal, otherwise
(nohup, SLURM, CI) a plain line at most every 30 s with done/total and an estimate of the time
left, and each note once, as a line on stderr. Stdout is never touched.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, TextIO


class Task:
    """One long step: ``advance(n)`` as work is done."""

    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


_reporter: Callable[[str, int | None], Task] | None = None


def install(reporter: Callable[[str, int | None], Task] | None) -> None:
    """Show every later ``task`` with ``reporter(label, total)`` (None: show nothing)."""
    global _reporter
    _reporter = reporter


_noter: Callable[[str], None] | None = None


def install_notes(noter: Callable[[str], None] | None) -> None:
    """Show every later ``notify`` line with ``noter(text)`` (None: show nothing)."""
    global _noter
    _noter = noter


def notify(text: str) -> None:
    """One line for the user about what was done other than asked (an image skipped, a plot not
    drawn), shown as the front end chose."""
    if _noter is not None:
        _noter(text)


@contextlib.contextmanager
def task(label: str, total: int | None) -> Iterator[Task]:
    """A step of ``total`` units of work (None: unknown), shown as the front end chose."""
    shown = _reporter(label, total) if _reporter is not None else Task()
    try:
        yield shown
    finally:
        shown.close()


class PlainLine(Task):
    """A line on ``stream`` at most every ``every`` seconds: label, done/total, time left."""

    def __init__(self, label: str, total: int | None, stream: TextIO, every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.stream, self.every, self.clock = label, total, stream, every, clock
        self.start = self.last = clock()
        self.done = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        of = f"/{self.total:,}" if self.total else ""
        left = ""
        if self.total and self.done:
            rest = (now - self.start) * (self.total - self.done) / self.done
            left = f", about {rest:,.0f} s left"
        self.stream.write(f"ann2snn: {self.label}: {self.done:,}{of} done after {now - self.start:,.0f} s{left}\n")
        self.stream.flush()


class Bars:
    """Rich progress bars on a terminal: one live display, one bar per open task (tasks nest)."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from ann2snn.io.markup import literal

        self.literal = literal  # a label may hold a user's words (a sweep's values)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console, transient=True)
        self.open = 0

    def __call__(self, label: str, total: int | None) -> Task:
        if self.open == 0:
            self.progress.start()
        self.open += 1
        bars, key = self, self.progress.add_task(self.literal(label), total=total)

        class Bar(Task):
            def advance(self, n: int = 1) -> None:
                bars.progress.advance(key, n)

            def close(self) -> None:
                bars.progress.remove_task(key)
                bars.open -= 1
                if bars.open == 0:
                    bars.progress.stop()

        return Bar()
