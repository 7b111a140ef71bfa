"""Progress of long work on the user's terminal: a live bar there, one plain line per interval in a log, with an ETA."""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

LINE_INTERVAL_S = 10.0  # a log gets one line per interval; a terminal gets a live bar


def duration(seconds: float) -> str:
    """`1h02m`, `3m05s` or `42s`."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class ProgressLine:
    """Counts `done` of `total` items; a tqdm bar on a terminal, else `what: done/total (x%), rate/s, ETA` lines."""

    def __init__(self, what: str, total: int, unit: str, stream: IO[str] | None = None, interval_s: float = LINE_INTERVAL_S) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.done = 0
        self.started = time.monotonic()
        self._stream = stream or sys.stderr
        self._interval_s = interval_s
        self._last = self.started
        self._lock = threading.Lock()  # thumbnail threads advance it together
        self._bar: Any = None
        if getattr(self._stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, file=self._stream, dynamic_ncols=True, desc=what)

    def advance(self, count: int = 1) -> None:
        """Count `count` more items done; safe from several threads."""
        with self._lock:
            self.done += count
            if self._bar is not None:
                self._bar.update(count)
            elif time.monotonic() - self._last >= self._interval_s:
                self._last = time.monotonic()
                print(self.line(), file=self._stream, flush=True)

    def line(self) -> str:
        seconds = time.monotonic() - self.started
        rate = self.done / seconds if seconds > 0 else 0.0
        eta = duration((self.total - self.done) / rate) if rate > 0 else "unknown"
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({percent:.1f}%), {rate:.3g} {self.unit}/s, ETA {eta}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
