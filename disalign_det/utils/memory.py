"""Process memory: resident set size now and at its peak, and handing freed heap back to the OS.

The one copy of these helpers, used by the evaluators (to start each pass low), the speed and
evaluation benchmarks (``tools/benchmark_*.py``, to measure stage peaks). Linux exposes what
is needed in ``/proc``; elsewhere the functions fall back to ``getrusage`` or do nothing.
"""

import ctypes
import functools
import gc
import logging
import resource
import sys

__all__ = ["current_rss_mb", "peak_rss_mb", "reset_peak_rss", "release_memory", "malloc_trim"]

logger = logging.getLogger(__name__)


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB: since the last successful
    :func:`reset_peak_rss`, else since the process started.

    Read from ``VmHWM`` of /proc/self/status (the counter that ``reset_peak_rss`` clears), else
    from ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def reset_peak_rss() -> bool:
    """Reset the peak-RSS counter to the current RSS (Linux >= 4.0: ``echo 5 >
    /proc/self/clear_refs``), so that a later :func:`peak_rss_mb` measures only what follows.

    Returns False where that is not possible; the peak then includes everything before.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _malloc_trim_fn():
    try:
        # The running process's own symbols include libc's; no library search needed.
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to trim
        return None


def malloc_trim() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim(0)``); False where unavailable."""
    trim = _malloc_trim_fn()
    if trim is None:
        return False
    trim(0)
    return True


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS.

    Between evaluation passes millions of small objects die; without ``malloc_trim`` glibc tends
    to keep the pages, and the RSS peak of the next pass would sit on top of the previous one. For
    a benchmark it makes the current RSS a fair baseline for a peak measured afterwards.
    """
    gc.collect()
    malloc_trim()
