"""Progress of long jobs: a live bar on a terminal, plain lines elsewhere (CI, log files, pipes).

* :class:`ProgressPrinter` -- the reusable printer: ``update(n, **postfix)``, ``close()``. On a
  terminal it redraws one line in place (``\\r``) with a bar, ``n/total``, the elapsed time, the
  ETA and the postfix (e.g. the current loss); otherwise it prints a plain :data:`LINE_PREFIX`
  line at most every ``interval`` seconds, and always the last one.
* :class:`TrainProgressHook` -- a detectron2 hook showing the training iterations, ETA and the
  current total loss (registered by ``Trainer.build_hooks``).
* :func:`track_loader` -- wraps an inference data loader so that evaluation shows its progress
  (images done / total, ETA) (used by ``Trainer.build_test_loader``).
* :func:`parse_line` -- reads a plain progress line back (``tools/demo.py`` shows the bars of the
  ``train_net.py`` processes it runs from their plain lines).

``DISALIGN_PROGRESS`` selects the style for a whole process tree: ``auto`` (default: bar on a
terminal, lines otherwise), ``bar``, ``lines`` or ``off``; ``DISALIGN_PROGRESS_INTERVAL`` is the
least number of seconds between two plain lines (default 15).
"""

import logging
import math
import os
import re
import sys
import time

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = [
    "LINE_PREFIX",
    "ProgressPrinter",
    "TrainProgressHook",
    "default_interval",
    "format_duration",
    "parse_line",
    "progress_style",
    "track_loader",
]

logger = logging.getLogger(__name__)

LINE_PREFIX = "[progress]"
_STYLES = ("auto", "bar", "lines", "off")
_LINE_RE = re.compile(
    r"^\[progress\] (?P<desc>\S+) (?P<n>\d+)/(?P<total>\d+)"
    r"(?: elapsed (?P<elapsed>\S+))?(?: eta (?P<eta>\S+))?(?P<rest>.*)$"
)


def format_duration(seconds):
    """``3723.4`` -> ``"1:02:03"``; unknown (None, NaN, inf) -> ``"?"``."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_style(stream):
    """``"bar"``, ``"lines"`` or ``"off"`` for ``stream`` (see ``DISALIGN_PROGRESS``)."""
    style = os.environ.get("DISALIGN_PROGRESS", "auto").strip().lower() or "auto"
    if style not in _STYLES:
        raise ValueError(f"DISALIGN_PROGRESS must be one of {_STYLES}, got {style!r}")
    if style == "auto":
        isatty = getattr(stream, "isatty", None)
        return "bar" if isatty is not None and isatty() else "lines"
    return style


def default_interval():
    """Seconds between progress lines: ``$DISALIGN_PROGRESS_INTERVAL`` (default 15)."""
    value = os.environ.get("DISALIGN_PROGRESS_INTERVAL", "15")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"DISALIGN_PROGRESS_INTERVAL must be a number of seconds, got {value!r}")


def _format_postfix(postfix):
    parts = []
    for k, v in postfix.items():
        if v is None:
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        parts.append(f"{k} {v}")
    return " ".join(parts)


class ProgressPrinter:
    """Progress of ``total`` steps named ``desc`` (one word, e.g. ``"train"``, ``"eval"``,
    ``"runs"``).

    Args:
        total: number of steps (> 0).
        desc: a name without spaces, shown first.
        stream: where to write (default: ``sys.stdout`` at the time of each write).
        style: ``"bar"``, ``"lines"``, ``"off"`` or None (from ``DISALIGN_PROGRESS`` and whether
            the stream is a terminal).
        interval: least seconds between two plain lines (default ``DISALIGN_PROGRESS_INTERVAL``).
        width: characters of the bar itself.
        clock: a ``time.monotonic``-like function (tests pass a fake one).
    """

    def __init__(self, total, desc, stream=None, style=None, interval=None, width=30, clock=None):
        if int(total) <= 0:
            raise ValueError(f"ProgressPrinter needs total > 0, got {total}")
        if not desc or any(c.isspace() for c in desc):
            raise ValueError(f"ProgressPrinter's desc must be one word, got {desc!r}")
        self.total = int(total)
        self.desc = desc
        self._stream = stream
        self.style = style or progress_style(self.stream)
        self.interval = default_interval() if interval is None else float(interval)
        self.width = int(width)
        self._clock = clock or time.monotonic
        self._start = self._clock()
        self._first = None  # (time, n) of the first update: the ETA ignores start-up time
        self._last_line = None
        self._drawn = False
        self.n = 0
        self.postfix = {}
        self.closed = False

    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stdout

    def eta(self):
        """Seconds left, from the rate since the first update (None before two updates)."""
        if self._first is None:
            return None
        t0, n0 = self._first
        done = self.n - n0
        if done <= 0:
            return None
        return (self._clock() - t0) / done * (self.total - self.n)

    def text(self):
        """The plain progress line, e.g.
        ``[progress] train 120/300 elapsed 0:01:40 eta 0:02:30 loss 1.234``."""
        line = (
            f"{LINE_PREFIX} {self.desc} {self.n}/{self.total} "
            f"elapsed {format_duration(self._clock() - self._start)} "
            f"eta {format_duration(self.eta())}"
        )
        post = _format_postfix(self.postfix)
        return f"{line} {post}" if post else line

    def bar_text(self):
        """The terminal line: ``train [#######-------]  120/300  40% 0:01:40<0:02:30 loss 1.23``."""
        return render_bar(
            self.desc,
            self.n,
            self.total,
            self._clock() - self._start,
            self.eta(),
            _format_postfix(self.postfix),
            self.width,
        )

    def update(self, n, **postfix):
        """Set the progress to ``n`` steps done (not an increment) and the postfix fields."""
        if self.closed:
            return
        self.n = min(int(n), self.total)
        if self._first is None:
            self._first = (self._clock(), self.n)
        self.postfix.update(postfix)
        self._show(final=self.n >= self.total)

    def _show(self, final=False):
        if self.style == "off":
            return
        if self.style == "bar":
            self.stream.write("\r\033[K" + self.bar_text() + ("\n" if final else ""))
            self._drawn = not final
            self.stream.flush()
            if final:
                self.closed = True
            return
        now = self._clock()
        if final or self._last_line is None or now - self._last_line >= self.interval:
            self._last_line = now
            self.stream.write(self.text() + "\n")
            self.stream.flush()
            if final:
                self.closed = True

    def clear(self):
        """Erase the bar from the terminal line (before something else is printed there)."""
        if self.style == "bar" and self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False

    def close(self):
        """Finish: a last line (plain style) or end the bar's line, whatever ``n`` is."""
        if self.closed:
            return
        if self.style == "lines" and self._last_line is not None:
            self.stream.write(self.text() + "\n")
        elif self.style == "bar" and self._drawn:
            self.stream.write("\n")
        self.stream.flush()
        self.closed = True


def render_bar(desc, n, total, elapsed, eta, postfix="", width=30):
    """One terminal line for ``n/total`` (shared by :class:`ProgressPrinter` and tools that
    re-render the plain lines of a child process). ``eta``/``elapsed``: seconds, None or text."""
    frac = n / total if total else 0.0
    filled = int(round(frac * width))
    bar = "#" * filled + "-" * (width - filled)
    digits = len(str(total))
    line = (
        f"{desc} [{bar}] {n:>{digits}}/{total} {frac:4.0%} "
        f"{_duration_text(elapsed)}<{_duration_text(eta)}"
    )
    return f"{line} {postfix}" if postfix else line


def _duration_text(x):
    return x if isinstance(x, str) else format_duration(x)


def parse_line(line):
    """A plain progress line -> dict(desc, n, total, elapsed, eta, rest) (strings but n/total),
    or None for any other line."""
    m = _LINE_RE.match(line.rstrip("\r\n"))
    if m is None:
        return None
    d = m.groupdict()
    d["n"], d["total"] = int(d["n"]), int(d["total"])
    d["rest"] = d["rest"].strip()
    return d


class _ClearBeforeLog(logging.Filter):
    """Erases the live bar before a log record is written to the same terminal, so log lines do
    not start in the middle of the bar (the next update redraws it)."""

    def __init__(self, printer):
        super().__init__()
        self.printer = printer

    def filter(self, record):
        self.printer.clear()
        return True


def _attach_clear_filter(printer):
    """Add :class:`_ClearBeforeLog` to the stream handlers of our and detectron2's loggers that
    write to a terminal; returns what to detach."""
    attached = []
    if printer.style != "bar":
        return attached
    for name in ("detectron2", "disalign_det", "fvcore", ""):
        for h in logging.getLogger(name).handlers:
            stream = getattr(h, "stream", None)
            if stream is not None and getattr(stream, "isatty", lambda: False)():
                f = _ClearBeforeLog(printer)
                h.addFilter(f)
                attached.append((h, f))
    return attached


def _detach(attached):
    for h, f in attached:
        h.removeFilter(f)


class TrainProgressHook(HookBase):
    """Training progress on the main process: iteration, ETA (from the iterations of this run)
    and the latest total loss of the event storage, after every step."""

    def __init__(self, max_iter, desc="train", **printer_kwargs):
        self.max_iter = int(max_iter)
        self.desc = desc
        self.printer_kwargs = printer_kwargs
        self.printer = None
        self._attached = []

    def before_train(self):
        if not comm.is_main_process() or self.max_iter <= 0:
            return
        self.printer = ProgressPrinter(self.max_iter, self.desc, **self.printer_kwargs)
        self._attached = _attach_clear_filter(self.printer)

    def after_step(self):
        if self.printer is None:
            return
        loss = None
        try:
            latest = self.trainer.storage.latest()
            if "total_loss" in latest:
                loss = float(latest["total_loss"][0])
        except Exception:  # a storage without the loss (e.g. not written yet): no loss shown
            loss = None
        self.printer.update(self.trainer.iter + 1, loss=loss)

    def after_train(self):
        if self.printer is not None:
            self.printer.close()
            _detach(self._attached)
            self.printer = None


class _TrackedLoader:
    """An iterable with the loader's length that updates a :class:`ProgressPrinter` as batches
    are taken (a batch taken means the previous one was processed)."""

    def __init__(self, loader, desc, printer_kwargs):
        self.loader = loader
        self.desc = desc
        self.printer_kwargs = printer_kwargs

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # dataset, batch_size ... of the wrapped loader
        return getattr(self.loader, name)

    def __iter__(self):
        total = len(self.loader)
        if not comm.is_main_process() or total <= 0:
            yield from self.loader
            return
        printer = ProgressPrinter(total, self.desc, **self.printer_kwargs)
        attached = _attach_clear_filter(printer)
        try:
            for i, batch in enumerate(self.loader):
                if i:
                    printer.update(i)
                yield batch
            printer.update(total)
        finally:
            printer.close()
            _detach(attached)


def track_loader(loader, desc="eval", **printer_kwargs):
    """``loader`` wrapped so that iterating it shows ``desc`` progress (images done / total)."""
    return _TrackedLoader(loader, desc, printer_kwargs)
