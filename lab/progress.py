"""Progress of a benchmark: runs done / total and an ETA, on one redrawn line on a terminal and as
plain lines elsewhere (CI logs, files)."""

import sys
import threading
import time
from typing import Callable, Optional, TextIO

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: Optional[float]) -> str:
    """``1h02m``, ``4m05s``, ``42s``; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Counts finished runs out of ``total`` and estimates the time left.

    The ETA is the elapsed time per finished run times the runs left, counting only runs that
    actually ran (reused ones cost nothing and would make the estimate too optimistic). Thread-safe:
    the scheduler's workers call :meth:`finished` concurrently.
    """

    def __init__(
        self,
        total: int,
        stream: Optional[TextIO] = None,
        clock: Callable[[], float] = time.perf_counter,
        tty: Optional[bool] = None,
    ):
        self.total = int(total)
        self.stream = stream if stream is not None else sys.stdout
        self.clock = clock
        self.tty = self.stream.isatty() if tty is None else tty
        self.done = 0
        self.executed = 0
        self._start = clock()
        self._executed_s = 0.0
        self._lock = threading.Lock()

    def eta_s(self) -> Optional[float]:
        """Seconds left (None before the first run that really ran has finished)."""
        left = self.total - self.done
        if left <= 0:
            return 0.0
        if self.executed == 0:
            return None
        return (self.clock() - self._start) / self.executed * left

    def line(self) -> str:
        elapsed = format_duration(self.clock() - self._start)
        return (
            f"[benchmark] progress: {self.done}/{self.total} runs done, "
            f"elapsed {elapsed}, ETA {format_duration(self.eta_s())}"
        )

    def log(self, msg: str) -> None:
        """Print ``[benchmark] msg`` on its own line, keeping a terminal's progress line last."""
        with self._lock:
            if self.tty and self.done:
                self.stream.write("\r\033[K")
            self.stream.write(f"[benchmark] {msg}\n")
            if self.tty and 0 < self.done < self.total:
                self.stream.write(self.line())
            self.stream.flush()

    def finished(self, executed: bool) -> None:
        """Record one finished run (``executed``: it ran, rather than being reused / skipped)."""
        with self._lock:
            self.done += 1
            self.executed += int(bool(executed))
            text = self.line()
            if self.tty:
                end = "\n" if self.done >= self.total else ""
                self.stream.write("\r\033[K" + text + end)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
