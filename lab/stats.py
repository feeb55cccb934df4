"""Statistics over seeds (mean, spread, significance of a gain) and their formatting, and the
median of timing rounds."""

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["format_gain", "format_stats", "gain_stats", "median", "seed_stats"]


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


def median(values: Sequence[float]) -> float:
    """Median (NaN for an empty sequence)."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return float("nan")
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])
