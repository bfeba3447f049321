"""Progress of long steps: a rich bar on a terminal, plain log lines otherwise.

Scheduled runs write to a journal or a log file, where a redrawn bar is
noise; there a line every 10% (or every 30 seconds) says how far the step
is, how fast it goes and when it should end.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger("reclo_agent.progress")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Task:
    """One step with a known total; ``advance`` may be called from any thread."""

    def __init__(self, description: str, total: int) -> None:
        self.description = description
        self.total = max(total, 0)
        self.done = 0
        self.note = ""
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
        self._changed()

    def set_done(self, done: int) -> None:
        """Set how far the step is (never backwards); from any thread."""
        with self._lock:
            if done <= self.done:
                return
            self.done = min(done, self.total) if self.total else done
        self._changed()

    def set_note(self, note: str) -> None:
        self.note = note
        self._changed()

    def _changed(self) -> None:  # overridden by the renderers
        pass

    def finish(self) -> None:
        pass

    def __enter__(self) -> Task:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish()


class _LogTask(Task):
    STEP = 0.10
    EVERY = 30.0

    def __init__(self, description: str, total: int) -> None:
        super().__init__(description, total)
        self._next_fraction = self.STEP
        self._last_line = time.monotonic()
        self._finished = False

    def _changed(self) -> None:
        now = time.monotonic()
        fraction = self.done / self.total if self.total else 1.0
        if fraction >= self._next_fraction or now - self._last_line >= self.EVERY:
            with self._lock:
                if fraction < self._next_fraction and now - self._last_line < self.EVERY:
                    return
                while self._next_fraction <= fraction:
                    self._next_fraction += self.STEP
                self._last_line = now
            if fraction < 1.0:
                log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        fraction = self.done / self.total if self.total else 1.0
        text = f"{self.description}: {fraction:.0%} ({human_bytes(self.done)} of {human_bytes(self.total)})"
        text += f" at {human_bytes(rate)}/s"
        if 0 < fraction < 1 and rate > 0:
            text += f", about {human_duration((self.total - self.done) / rate)} left"
        if self.note:
            text += f"; {self.note}"
        return text

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            elapsed = time.monotonic() - self.started
            log.info(
                "%s: done, %s in %s (%s/s)%s",
                self.description,
                human_bytes(self.done),
                human_duration(elapsed),
                human_bytes(self.done / max(elapsed, 1e-6)),
                f"; {self.note}" if self.note else "",
            )


class _RichTask(Task):
    def __init__(self, description: str, total: int, progress) -> None:
        super().__init__(description, total)
        self._progress = progress
        self._id = progress.add_task(description, total=total or None, note="")
        progress.start()

    def _changed(self) -> None:
        self._progress.update(self._id, completed=self.done, note=self.note)

    def finish(self) -> None:
        self._progress.update(self._id, completed=self.done, note=self.note)
        self._progress.stop()


class Reporter:
    """Makes tasks: rich bars when ``stderr`` is a terminal (unless ``plain``)."""

    def __init__(self, *, plain: bool | None = None, quiet: bool = False) -> None:
        self.quiet = quiet
        self.rich = (not quiet) and (sys.stderr.isatty() if plain is None else not plain)

    def task(self, description: str, total: int) -> Task:
        if self.quiet:
            return Task(description, total)
        if not self.rich:
            return _LogTask(description, total)
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=Console(stderr=True),
            transient=False,
        )
        return _RichTask(description, total, progress)


def callback(task: Task) -> Callable[[int], None]:
    return task.advance
