#!/usr/bin/env python
"""Plot two runs' per-class AP against training frequency, to see which classes a change moved.

Every evaluation writes ``per_class_ap.json`` next to ``metrics_final.json`` (its OUTPUT_DIR);
give the two runs' OUTPUT_DIRs (or the json files). Left panel: AP of every class for both runs
against the class's training instances (log x), run A hollow, run B filled, a grey line joining
them; right panel: the change B - A per class with the mean change of each r/c/f group. Also
prints the mean AP of each group for both runs.

Examples::

    python tools/plot_per_class.py output/stage_one output/disalign --out per_class.png
    python tools/plot_per_class.py a/per_class_ap.json b/per_class_ap.json --task bbox_fixed \\
        --labels "stage one" "DisAlign"
"""

import argparse
import logging
import math
import os

from disalign_det.evaluation.per_class import read_per_class_table

logger = logging.getLogger("disalign_det.plot_per_class")

COLOURS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}
NAMES = {"r": "rare", "c": "common", "f": "frequent"}


def paired_per_class(rows_a, rows_b, task):
    """Classes evaluated in both runs: list of (category_id, name, frequency, train instances,
    AP A, AP B), AP in percent (NaN where undefined).

    Raises if the two runs have different classes or the task is missing.
    """
    column = f"{task}_AP"
    for label, rows in (("A", rows_a), ("B", rows_b)):
        if rows and column not in rows[0]:
            have = sorted(k[:-3] for k in rows[0] if k.endswith("_AP"))
            raise ValueError(f"run {label} has no {task!r} per-class AP (--task; it has {have})")
    by_id = {r["category_id"]: r for r in rows_b}
    if set(by_id) != {r["category_id"] for r in rows_a}:
        raise ValueError("the two runs were evaluated on different classes")

    def ap(r):
        v = r[column]
        return float("nan") if v is None else float(v)

    out = []
    for a in rows_a:
        b = by_id[a["category_id"]]
        count = a.get("train_instance_count")
        count = float("nan") if count is None else float(count)
        out.append((a["category_id"], a["name"], a["frequency"], count, ap(a), ap(b)))
    return out


def group_means(pairs):
    """{'all'/'r'/'c'/'f': (mean AP A, mean AP B, classes)} over classes defined in both runs."""
    out = {}
    for group in ("all", "r", "c", "f"):
        sel = [
            (a, b)
            for _, _, f, _, a, b in pairs
            if (group == "all" or f == group) and not (math.isnan(a) or math.isnan(b))
        ]
        if sel:
            out[group] = (
                sum(a for a, _ in sel) / len(sel),
                sum(b for _, b in sel) / len(sel),
                len(sel),
            )
    return out


def plot(pairs, labels, task, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Patch

    if all(math.isnan(p[3]) for p in pairs):
        logger.warning("No training counts in the tables: classes are spread by id instead")
        x = np.arange(1, len(pairs) + 1, dtype=float)
        xlabel = "class (no training counts in the table)"
    else:
        x = np.maximum(np.array([p[3] for p in pairs]), 1)
        xlabel = "training instances of the class (log scale)"
    freq = [p[2] for p in pairs]
    colours = [COLOURS.get(f, "0.4") for f in freq]
    a = np.array([p[4] for p in pairs])
    b = np.array([p[5] for p in pairs])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    ax1.scatter(x, a, facecolors="none", edgecolors=colours, s=34, label=labels[0], zorder=3)
    ax1.scatter(x, b, c=colours, marker="D", s=24, label=labels[1], zorder=4)
    for xi, ya, yb in zip(x, a, b):
        if np.isfinite(ya) and np.isfinite(yb):
            ax1.plot([xi, xi], [ya, yb], color="0.6", lw=0.8, zorder=2)
    ax1.set_ylabel(f"{task} AP per class")
    d = b - a
    ax2.scatter(x, d, c=colours, s=20, zorder=3)
    ax2.axhline(0, color="0.3", lw=0.8)
    means = group_means(pairs)
    for g in "rcf":
        if g in means:
            ax2.axhline(means[g][1] - means[g][0], color=COLOURS[g], ls="--", lw=1)
    ax2.set_ylabel(f"{task} AP change ({labels[1]} - {labels[0]}); dashed: group means")
    for ax in (ax1, ax2):
        if xlabel.startswith("training"):
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    handles, names = ax1.get_legend_handles_labels()
    handles += [Patch(color=c, alpha=0.6) for c in COLOURS.values()]
    names += [NAMES[g] for g in COLOURS]
    fig.legend(handles, names, loc="upper center", ncol=len(names), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_a", help="OUTPUT_DIR (or per_class_ap.json) of the first run")
    parser.add_argument("run_b", help="OUTPUT_DIR (or per_class_ap.json) of the second run")
    parser.add_argument("--task", default="segm", help="segm, bbox, segm_fixed or bbox_fixed")
    parser.add_argument("--labels", nargs=2, default=None, help="names of the two runs")
    parser.add_argument("--out", default="per_class.png", help="PNG to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    labels = args.labels or [
        os.path.basename(os.path.normpath(p)) for p in (args.run_a, args.run_b)
    ]
    pairs = paired_per_class(
        read_per_class_table(args.run_a), read_per_class_table(args.run_b), args.task
    )
    plot(pairs, labels, args.task, args.out)
    for group, (ma, mb, n) in group_means(pairs).items():
        change = f"{mb - ma:+.2f}, {n} classes"
        print(f"{group:>4}: {labels[0]} {ma:6.2f}  {labels[1]} {mb:6.2f}  ({change})")
    print(f"wrote {args.out}")
    return pairs


if __name__ == "__main__":
    main()
