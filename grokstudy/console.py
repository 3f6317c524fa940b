"""How `grokstudy run` shows a running study: one live bar on a terminal, a timestamped line at
most every LINE_EVERY_S off one (`ray job logs`, CI); and Ray's, MLflow's and Tune's own output
sent to `<out>/driver.log` instead of the console. A helper of `cli`, the one module that prints.

The bar is drawn with `tqdm.format_meter`: tqdm is installed already (Optuna needs it; 0.09 s to
import, measured), where rich would be a new dependency for one line. grokstudy computes the
elapsed time (since the study first started, resumes included) and the rate (this driver run's)
itself, so the bar is drawn from those rather than from tqdm's own clock.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from grokstudy.progress import Progress

LINE_EVERY_S = 30.0
"""Off a terminal: at most one progress line this often (a warning or the last line always shows)."""
DRIVER_LOG = "driver.log"


class ProgressView:
    """Shows each `Progress` the study emits: a bar redrawn in place on a terminal, else lines."""

    def __init__(self, out: TextIO, tty: bool | None = None, every_s: float = LINE_EVERY_S) -> None:
        self.out, self.every_s = out, every_s
        self.tty = out.isatty() if tty is None else tty
        self.last_line_at: float | None = None
        self.last_warning: str | None = None
        self.drawn = False

    def __call__(self, p: Progress) -> None:
        warning_changed = p.warning != self.last_warning
        self.last_warning = p.warning
        if self.tty:
            self._bar(p)
            if warning_changed and p.warning:
                self._newline()
                print(f"  warning: {p.warning}", file=self.out, flush=True)
            return
        now = time.monotonic()
        last = p.total is not None and p.done + p.failed >= p.total
        if warning_changed or last or self.last_line_at is None or now - self.last_line_at >= self.every_s:
            self.last_line_at = now
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line(p)}", file=self.out, flush=True)
            if warning_changed and p.warning:
                print(f"  warning: {p.warning}", file=self.out, flush=True)

    def _bar(self, p: Progress) -> None:
        from tqdm import tqdm

        finished = p.done + p.failed
        rate = None
        if p.eta_s and p.total is not None and p.total > finished:
            rate = (p.total - finished) / p.eta_s
        width = _columns(self.out)
        meter = tqdm.format_meter(
            finished, p.total, p.elapsed_s, prefix="trials", unit="trial", rate=rate,
            bar_format="{l_bar}{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]" if p.total
            else "{l_bar}{n_fmt} [{elapsed}]",
        )  # fmt: skip
        text = f"{meter} {_counts(p)}"
        print("\r" + text[:width].ljust(width), end="", file=self.out, flush=True)
        self.drawn = True

    def _newline(self) -> None:
        if self.drawn:
            print(file=self.out, flush=True)
            self.drawn = False

    def close(self) -> None:
        """End the bar's line (before the summary prints)."""
        self._newline()


class NotebookProgress:
    """A study's progress as a `tqdm.auto` bar: a widget in Jupyter, text elsewhere (on stdout:
    while a study runs, stderr goes to driver.log)."""

    def __init__(self, total: int | None) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="trial", desc="trials", file=sys.stdout, dynamic_ncols=True)

    def __call__(self, p: Progress) -> None:
        if p.total is not None and self.bar.total != p.total:
            self.bar.total = p.total
        self.bar.n = p.done + p.failed
        self.bar.set_postfix_str(_counts(p), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def line(p: Progress) -> str:
    """One line of a study's progress: counts, elapsed, ETA, phases."""
    total = "?" if p.total is None else str(p.total)
    eta = "" if not p.eta_s else f", ETA {duration(p.eta_s)}"
    return f"trials {p.done + p.failed}/{total} | {_counts(p)} | elapsed {duration(p.elapsed_s)}{eta}"


def _counts(p: Progress) -> str:
    pending = "" if p.pending is None else f", {p.pending} pending"
    phases = ", ".join(f"{k} {v}" for k, v in sorted(p.phases.items()))
    return f"{p.done} done, {p.running} running, {p.failed} failed{pending}" + (
        f" | {phases}" if phases else ""
    )


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _columns(out: TextIO) -> int:
    """The terminal's width (COLUMNS first; 200 where it cannot be told, as on a pty without a
    size), less one so the cursor never wraps."""
    import shutil

    return max(40, shutil.get_terminal_size(fallback=(200, 24)).columns - 1)


@contextlib.contextmanager
def library_output_to(path: Path) -> Iterator[TextIO]:
    """Send everything written to this process's stderr (file descriptor 2: Ray's, MLflow's and
    Tune's loggers, warnings, native code) to `path` for the block; yields a stream on the real
    stderr for what people must see. Restored on exit, whatever happened."""
    sys.stderr.flush()
    saved = os.dup(2)
    real = os.fdopen(os.dup(saved), "w", buffering=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    try:
        os.dup2(fd, 2)
        os.close(fd)
        yield real
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        real.close()
