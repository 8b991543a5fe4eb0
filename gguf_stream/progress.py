"""Progress of the long steps (loading tens of GiB into pinned memory, the
generate split's calibration, assembling the embedded model on first use).

On a terminal: a bar with bytes and rate (tqdm where it is installed, else a
one-line bar of our own). Elsewhere (a log, CI, a pipe): plain lines on
stderr, at most one per PROGRESS_STEP percent, rising, the last at 100%.
Disabled: nothing at all. The API prints nothing unless asked
(EngineConfig.progress, StreamedLlama(progress=True)); the CLI asks unless -q.
"""
from __future__ import annotations

import sys
import time

PREFIX = "gguf-stream"
PROGRESS_STEP = 10  # percent between plain lines
REDRAW_SECONDS = 0.1  # our own terminal bar, at most this often


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover (the loop returns)


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """One step's progress in bytes: update(done) with the bytes done so far
    (monotone: a smaller value is ignored), close() at the end (it shows 100%
    once when finished, else where it stopped). A context manager."""

    def __init__(self, what: str, total: int, *, enabled: bool = True, stream=None, tty: bool | None = None):
        self.what, self.total = what, max(int(total), 0)
        self.enabled = enabled
        self._owned = None
        if stream is None and enabled:
            stream = self._owned = stable_stderr()
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.done = 0
        self._t0 = time.perf_counter()
        self._next_pct = 0
        self._drawn = 0.0
        self._bar = None
        self._closed = False
        if enabled and self.tty:
            self._bar = _tqdm(what, self.total, self.stream)

    def update(self, done: int) -> None:
        if not self.enabled or self._closed:
            return
        done = min(int(done), self.total) if self.total else int(done)
        if done <= self.done and done != 0:
            return
        step, self.done = done - self.done, done
        if self._bar is not None:
            self._bar.update(step)
        elif self.tty:
            now = time.perf_counter()
            if now - self._drawn >= REDRAW_SECONDS or done == self.total:  # llama.cpp reports every tensor
                self._drawn = now
                self._draw()
        else:
            pct = 100 * done // self.total if self.total else 100
            if pct >= self._next_pct and pct < 100:
                self._line(pct)
                self._next_pct = (pct // PROGRESS_STEP + 1) * PROGRESS_STEP

    def finish(self) -> None:
        """The step completed: 100%."""
        self.update(self.total)
        self.close(finished=True)

    def close(self, finished: bool = False) -> None:
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.tty:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        elif finished:
            self._line(100)
        if self._owned is not None and self._owned is not sys.stderr:
            self._owned.close()

    def _rate(self) -> str:
        seconds = time.perf_counter() - self._t0
        return f"{_size(self.done / seconds)}/s" if seconds > 0 and self.done else "-"

    def _line(self, pct: int) -> None:
        self.stream.write(f"{PREFIX}: {self.what}: {pct:3d}% ({_size(self.done)} of {_size(self.total)}, "
                          f"{self._rate()})\n")
        self.stream.flush()

    def _draw(self) -> None:
        frac = self.done / self.total if self.total else 1.0
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        self.stream.write(f"\r{PREFIX}: {self.what} [{bar}] {100 * frac:3.0f}% {_size(self.done)}/"
                          f"{_size(self.total)} {self._rate()}  ")
        self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.finish()
        else:
            self.close()


def stable_stderr():
    """stderr as it is now, kept for later: llama-cpp-python silences a
    non-verbose load by pointing file descriptor 2 (and sys.stderr) at
    /dev/null meanwhile, so the load's progress writes to a duplicate of the
    descriptor. Where stderr has none (a test's capture), the object itself."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        return sys.stderr
    import os

    return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace", closefd=True)


def _tqdm(what: str, total: int, stream):
    """tqdm's bar where tqdm is installed (it comes with gguf), else None."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"{PREFIX}: {what}", unit="B", unit_scale=True, unit_divisor=1024,
                file=stream, leave=True, dynamic_ncols=True)


def note(msg: str, enabled: bool, stream=None) -> None:
    """A plain progress line on stderr (steps without a byte count)."""
    if enabled:
        stream = stream if stream is not None else sys.stderr
        stream.write(f"{PREFIX}: {msg}\n")
        stream.flush()
