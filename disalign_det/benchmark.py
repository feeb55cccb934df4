"""Helpers shared by ``tools/benchmark_longtail.py`` and ``tools/benchmark_speed.py``.

* Per-class AP from the LVIS API's accumulated precision array (:func:`per_class_ap_from_precision`,
  :func:`lvis_per_class_ap`), the quantity behind the per-class plots.
* Statistics over seeds (:func:`seed_stats`, :func:`gain_stats`) and their formatting.
* Timing and memory primitives for the speed benchmark (:func:`median`, :func:`current_rss_mb`,
  :func:`peak_rss_mb`).
"""

import logging
import math
import resource
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

# Per-class AP lives in disalign_det.evaluation.per_class; re-exported for existing imports.
from .evaluation.per_class import (  # noqa: F401
    PerClassAP,
    lvis_per_class_ap,
    per_class_ap_from_precision,
)

__all__ = [
    "per_class_ap_from_precision",
    "lvis_per_class_ap",
    "PerClassAP",
    "seed_stats",
    "gain_stats",
    "format_stats",
    "format_gain",
    "median",
    "current_rss_mb",
    "peak_rss_mb",
    "reset_peak_rss",
    "release_memory",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Statistics over seeds
# --------------------------------------------------------------------------------------------------


def _finite(values: Sequence[Optional[float]]) -> List[float]:
    out = []
    for v in values:
        if v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            out.append(v)
    return out


def seed_stats(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """Mean, sample standard deviation (ddof = 1), min and max over seeds.

    None / NaN values (a metric a run could not compute) are left out and counted in ``n``'s
    complement; ``std`` is None with fewer than two values (a spread of one seed is unknown, not
    zero).
    """
    vals = _finite(values)
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "values": []}
    arr = np.asarray(vals)
    return {
        "n": n,
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if n > 1 else None,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "values": [float(v) for v in arr],
    }


def gain_stats(after: Sequence[Optional[float]], before: Sequence[Optional[float]]) -> dict:
    """Statistics of the per-seed gains ``after[i] - before[i]`` and whether they are significant.

    A gain counts as significant only if it stands out of its own seed-to-seed spread: at least two
    seeds, every per-seed gain of the same sign (zero is not inside [min, max]) and
    ``|mean| > std``. Otherwise ``significant`` is False (or None with a single seed, where the
    spread is unknown).
    """
    if len(after) != len(before):
        raise ValueError(f"{len(after)} values after vs {len(before)} before: seeds must pair up")
    gains = [None if a is None or b is None else float(a) - float(b) for a, b in zip(after, before)]
    st = seed_stats(gains)
    if st["n"] < 2:
        st["significant"] = None
    else:
        same_sign = st["min"] > 0 or st["max"] < 0
        st["significant"] = bool(same_sign and abs(st["mean"]) > st["std"])
    return st


def _num(v, digits=1):
    return "n/a" if v is None else f"{v:.{digits}f}"


def format_stats(st: dict, digits: int = 1, spread: bool = True) -> str:
    """``mean ± std (min–max)``; just the mean for a single seed; ``n/a`` without values."""
    if not st or st.get("n", 0) == 0:
        return "n/a"
    if st["n"] == 1 or not spread:
        return _num(st["mean"], digits)
    return (
        f"{_num(st['mean'], digits)} ± {_num(st['std'], digits)} "
        f"({_num(st['min'], digits)}–{_num(st['max'], digits)})"
    )


def format_gain(st: dict, digits: int = 1) -> str:
    """Signed gain ``+1.2 ± 0.3 (+0.9–+1.5)``, suffixed ``n.s.`` when not significant."""
    if not st or st.get("n", 0) == 0:
        return "n/a"

    def sgn(v):
        return "n/a" if v is None else f"{v:+.{digits}f}"

    if st["n"] == 1:
        return f"{sgn(st['mean'])} (1 seed)"
    text = f"{sgn(st['mean'])} ± {_num(st['std'], digits)} ({sgn(st['min'])}–{sgn(st['max'])})"
    if not st.get("significant"):
        text += " n.s."
    return text


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """Median (NaN for an empty sequence)."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return float("nan")
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])


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
