"""The benchmark's plot: per-class AP against the class's training instances."""

from .plan import STAGE_ONES, TASK_LABEL
from .results import DatasetInfo

__all__ = ["BUCKET_COLOURS", "BUCKET_NAMES", "plot_per_class"]


BUCKET_COLOURS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}
BUCKET_NAMES = {"r": "rare", "c": "common", "f": "frequent"}


def plot_per_class(per_class, info: DatasetInfo, task, stage_ones, path, num_seeds) -> None:
    """Per-class AP against training instances (log x), stage one vs DisAlign box+mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(info.instance_count, dtype=float)
    freq = np.asarray(info.frequency)
    # One panel per stage one; at least 7 inches wide so the one-row legend fits above one panel.
    fig, axes = plt.subplots(
        1, len(stage_ones), figsize=(max(7.0, 5.2 * len(stage_ones)), 4.6), sharey=True,
        squeeze=False,
    )  # fmt: skip
    for ax, g in zip(axes[0], stage_ones):
        # Bucket ranges shaded (buckets are defined on IMAGE counts, so instance-count ranges of
        # neighbouring buckets may overlap slightly: the markers' colours are authoritative).
        for b, colour in BUCKET_COLOURS.items():
            sel = freq == b
            if sel.any():
                lo, hi = counts[sel].min(), counts[sel].max()
                ax.axvspan(lo / 1.15, hi * 1.15, color=colour, alpha=0.08, lw=0)
        s1 = per_class.get(g, {}).get("stage_one")
        s2 = per_class.get(g, {}).get("disalign_box_mask")
        x = np.maximum(counts, 1)
        if s1 is not None:
            y1 = np.asarray(s1["mean"], dtype=float)
            ax.scatter(
                x,
                y1,
                facecolors="none",
                edgecolors=[BUCKET_COLOURS[b] for b in freq],
                s=36,
                label="stage one",
                zorder=3,
            )
        if s2 is not None:
            y2 = np.asarray(s2["mean"], dtype=float)
            ax.scatter(
                x,
                y2,
                c=[BUCKET_COLOURS[b] for b in freq],
                marker="D",
                s=26,
                label="+ DisAlign box+mask",
                zorder=4,
            )
        if s1 is not None and s2 is not None:
            for xi, a, b in zip(x, y1, y2):
                if np.isfinite(a) and np.isfinite(b):
                    ax.plot([xi, xi], [a, b], color="0.5", lw=0.8, zorder=2)
        ax.set_xscale("log")
        ax.set_title(f"{STAGE_ONES[g].label} stage one")
        ax.set_xlabel("training instances of the class (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(f"{TASK_LABEL[task]} AP per class (mean of {num_seeds} seed(s))")
    handles, labels = axes[0][0].get_legend_handles_labels()
    from matplotlib.patches import Patch

    handles += [Patch(color=c, alpha=0.5, label=BUCKET_NAMES[b]) for b, c in BUCKET_COLOURS.items()]
    labels += [BUCKET_NAMES[b] for b in BUCKET_COLOURS]
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)
