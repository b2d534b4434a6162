"""What the CLI shows on stderr while it works, and how wide its text may be.

The library reports progress through one callback, ``progress(index, total, label)``, called
before each item of a long phase (``"timing <layer>"``, ``"sensitivity <layer>"``, ``"refit
<layer>"``, ``"budget: measuring <layer>"``, a bare layer name while a rank rule builds) and
after each batch of calibration samples (``"calibration samples"``). This module only renders
it:

- on a terminal, with rich: one row per phase (bar, done/total, elapsed, ETA, the current
  layer), finished phases left in place with their time, and a first row whose clock keeps
  running between phases that report nothing (checks, verification, the final timing);
- elsewhere (a pipe, a CI log), plain lines: nothing in the first few seconds (a quick run,
  or a quick failure whose one error line a pipeline parses, prints none), then one line when
  a phase starts and one per quarter of it.
"""
from __future__ import annotations

import logging
import sys
import time

from onnxlr import escape

#: Plain progress lines start only after this many seconds.
PLAIN_AFTER_SECONDS = 3.0


def phase_of(label: str) -> tuple[str, str]:
    """Split a progress label into its phase and the item: ``'timing conv1'`` → ``('timing',
    'conv1')``, ``'budget: measuring fc'`` → ``('budget: measuring', 'fc')``, ``'calibration
    samples'`` → ``('calibration samples', '')``; a bare layer name (a rank rule's build) →
    ``('factorising', name)``."""
    label = str(label)
    head, _, rest = label.partition(" ")
    if label.endswith(" samples") or label == "calibration":
        return label, ""
    if head.endswith(":") and rest:
        verb, _, item = rest.partition(" ")
        return f"{head} {verb}", item
    if rest and head.isalpha() and head.islower():
        return head, rest
    return "factorising", label


def _after_item(phase: str) -> bool:
    """Calibration reports after each batch (index = samples done - 1); the rest before."""
    return phase.endswith("samples") or phase == "calibration"


def tail(text: str, room: int) -> str:
    """The end of ``text`` in ``room`` columns (a layer's most specific part is its end)."""
    if len(text) <= room:
        return text
    return "…" + text[-(room - 1):] if room > 1 else ""


class Plain:
    """Plain lines for a log: each phase's start and every quarter of it, after a quiet start."""

    def __init__(self, stream=None, clock=time.monotonic):
        self.stream, self.clock = stream, clock
        self.start: float | None = None
        self.phase: str | None = None
        self.step = -1

    def __call__(self, i: int, total: int, label: str) -> None:
        now = self.clock()
        if self.start is None:
            self.start = now
        if now - self.start < PLAIN_AFTER_SECONDS:
            return
        phase, _ = phase_of(label)
        quarter = 4 * i // max(total, 1)
        if phase != self.phase or quarter != self.step:
            self.phase, self.step = phase, quarter
            print(f"onnxlr: {escape.text(label)} ({i + 1}/{total})",
                  file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        pass


class Terminal:
    """rich progress rows on a terminal (stderr): one per phase, with ETA.

    The library says when an item starts, not when a phase ends: a finished phase's time is
    its first callback to its last, plus one mean item (calibration reports after each
    batch: to its last callback), so that the unreported work after it (checks,
    verification, the final timing) is not counted as the phase's. The first row is the
    run's own clock, which keeps running through that work and stays with the total."""

    def __init__(self, stream=None, what: str = "onnxlr", console=None, clock=None):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                                   TextColumn, TimeElapsedColumn, TimeRemainingColumn)
        self.console = console or Console(file=stream or sys.stderr, highlight=False)
        kwargs = {"get_time": clock} if clock is not None else {}
        self.progress = Progress(
            SpinnerColumn(finished_text="✓" if _utf8(self.console) else "ok"),
            TextColumn("{task.fields[phase]}"), _phased(BarColumn(bar_width=20)),
            _phased(MofNCompleteColumn()), TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            _phased(TimeRemainingColumn(compact=True), running=True),
            TextColumn("{task.fields[item]}"),
            console=self.console, transient=False, refresh_per_second=8,
            redirect_stderr=True, redirect_stdout=False, **kwargs)
        self.what = what
        self.overall = None
        self.tasks: dict[str, int] = {}
        self.seen: dict[str, list[float]] = {}   # phase → [first call, last call, last index]
        self.current: str | None = None
        self.started = False

    def _task(self, task_id: int):
        return next(t for t in self.progress.tasks if t.id == task_id)

    def _start(self) -> None:
        if not self.started:
            self.progress.start()
            self.overall = self.progress.add_task("", total=None, phase=self.what, eta="",
                                                  item="", overall=True)
            self.started = True

    def _finish(self, phase: str) -> None:
        task = self._task(self.tasks[phase])
        self.progress.update(task.id, completed=task.total, item="", eta="")
        first, last, index = self.seen[phase]
        end = last
        if not _after_item(phase):
            mean = (last - first) / index if index else self.progress.get_time() - first
            end = min(self.progress.get_time(), last + mean)
        if task.start_time is not None:
            task.finished_time = max(0.0, end - task.start_time)

    def __call__(self, i: int, total: int, label: str) -> None:
        from rich.markup import escape as markup
        self._start()
        phase, item = phase_of(label)
        if self.current is not None and (phase != self.current or i < self.seen[phase][2]):
            self._finish(self.current)
        done = min(i + 1 if _after_item(phase) else i, total)
        # the row's fixed columns take ~58; the item gets what is left of the terminal
        room = max(0, self.console.width - 58 - len(phase))
        fields = {"phase": markup(phase), "item": markup(tail(escape.text(item), room)),
                  "eta": "eta", "overall": False}
        now = self.progress.get_time()
        if (phase not in self.tasks or self._task(self.tasks[phase]).total != max(total, 1)
                or i < self.seen[phase][2]):    # the phase again (another pass): a new row
            self.tasks[phase] = self.progress.add_task("", total=max(total, 1), **fields)
            self.seen[phase] = [now, now, i]
        self.seen[phase][1:] = [now, i]
        self.progress.update(self.tasks[phase], completed=done, **fields)
        self.current = phase

    def close(self) -> None:
        if not self.started:
            return
        if self.current is not None:
            self._finish(self.current)
        if self.overall is not None:
            self.progress.update(self.overall, total=1, completed=1, phase=f"{self.what} (total)")
        self.progress.stop()
        self.started = False


def _phased(column, running: bool = False):
    """A column drawn for the phases only, not for the first row (the run's running clock);
    with ``running``, only while the phase runs (an ETA)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Phased(ProgressColumn):
        def render(self, task):
            hidden = task.fields.get("overall") or (running and task.finished)
            return Text("") if hidden else column.render(task)
    return Phased()


def _utf8(console) -> bool:
    return (console.encoding or "").lower().replace("-", "") == "utf8"


class StderrHandler(logging.StreamHandler):
    """A log handler that writes to whatever ``sys.stderr`` is when a record comes, so that
    log lines print above a live progress display (which replaces ``sys.stderr``) instead of
    through it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def view(quiet: bool, stream=None, what: str = "onnxlr"):
    """The progress renderer for this run: none when quiet, rich rows on a terminal, plain
    lines otherwise."""
    stream = stream or sys.stderr
    if quiet:
        return None
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return Terminal(stream, what) if tty else Plain(stream)
