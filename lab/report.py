"""Formatting of LVIS results as the tables the tools print (``tools/demo.py``, the benchmark)."""

import json
import math

__all__ = ["METRICS", "load_metrics", "metrics_table"]

# The columns users read first: overall AP and the rare / common / frequent split.
METRICS = ("AP", "APr", "APc", "APf")


def load_metrics(path):
    """The results dict a run wrote (``metrics_final.json``: {"bbox": {...}, "segm": {...}})."""
    with open(path) as f:
        results = json.load(f)
    # Trainer.test returns {dataset: {task: {...}}} for several test sets, {task: {...}} for one.
    if "bbox" not in results and len(results) == 1:
        results = next(iter(results.values()))
    return results


def _fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.1f}"


def metrics_table(rows, tasks=("bbox", "segm")):
    """Markdown table: one row per (name, results) pair; box and mask AP / APr / APc / APf."""
    labels = {"bbox": "box", "segm": "mask"}
    header = ["method"] + [f"{labels[t]} {m}" for t in tasks for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, results in rows:
        cells = [name]
        for t in tasks:
            task = results.get(t, {})
            cells += [_fmt(task.get(m)) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
