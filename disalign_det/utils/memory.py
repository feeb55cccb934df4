"""Process memory: resident set size now and at its peak, and handing freed heap back to the OS.

Linux exposes what is needed in ``/proc``; elsewhere the functions fall back to ``getrusage`` or do
nothing.
"""

import resource
import sys

__all__ = ["current_rss_mb", "peak_rss_mb", "release_memory", "reset_peak_rss"]


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


def release_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc ``malloc_trim``), so that the
    current RSS is a fair baseline for a peak measured afterwards."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
