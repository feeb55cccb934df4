"""The benchmark's results: per-seed summaries and tables, per-class AP from saved detections, and
the re-evaluation at an LVIS-like detection budget."""

import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

from disalign_det.evaluation.per_class import PerClassAP, lvis_per_class_ap

from .plan import STAGE_ONES, SYNTH, TASK_LABEL, TASKS, Preset, Run, method_rows
from .report import METRICS, metrics_table
from .stats import format_gain, format_stats, gain_stats, seed_stats

__all__ = [
    "DatasetInfo",
    "budget_metrics",
    "dataset_info",
    "fixed_ap_metrics",
    "gain_table",
    "lvis_like_budget",
    "lvis_like_fixed_ap_k",
    "mean_table",
    "per_class_means",
    "run_per_class_ap",
    "stats_table",
    "summarise",
    "timing_table",
]


def _metric(metrics: Optional[dict], task: str, metric: str) -> Optional[float]:
    """One metric of a finished run's ``{task: {metric: value}}``, None if the run is missing or
    the metric undefined."""
    if not metrics:
        return None
    v = metrics.get(task, {}).get(metric)
    # The LVIS API reports -1 (-> -100) for a bucket without ground truth: undefined, not a score.
    if v is None or not math.isfinite(v) or v < 0:
        return None
    return float(v)


def summarise(
    runs: Sequence[Run],
    preset: Preset,
    stage_ones: Sequence[str],
    metrics_of: Optional[Callable[[Run], Optional[dict]]] = None,
) -> List[dict]:
    """One dict per table row: per-seed values, their statistics and, for every method built on a
    stage one, the per-seed gains over that stage one.

    ``metrics_of(run)`` gives a run's ``{task: {metric: value}}`` (default: its
    ``metrics_final.json``, i.e. the evaluation at TEST.DETECTIONS_PER_IMAGE).
    """
    metrics_of = metrics_of or (lambda run: run.metrics)
    by_key = {(r.seed, r.stage_one, r.method): r for r in runs}
    metrics = {k: metrics_of(r) for k, r in by_key.items()}
    rows = []
    for g, method, label in method_rows(stage_ones, preset.posthoc_powers, preset.methods):
        row = {"stage_one": g, "method": method, "label": label, "seeds": list(preset.seeds)}
        row["status"] = [by_key[(s, g, method)].status for s in preset.seeds]
        row["values"], row["stats"], row["gain"] = {}, {}, {}
        for task in TASKS:
            row["values"][task], row["stats"][task], row["gain"][task] = {}, {}, {}
            for m in METRICS:
                vals = [_metric(metrics[(s, g, method)], task, m) for s in preset.seeds]
                row["values"][task][m] = vals
                row["stats"][task][m] = seed_stats(vals)
                if method != "stage_one":
                    base = [_metric(metrics[(s, g, "stage_one")], task, m) for s in preset.seeds]
                    row["gain"][task][m] = gain_stats(vals, base)
        rows.append(row)
    return rows


def stats_table(rows, task) -> str:
    """Markdown: one row per method, ``mean ± std (min–max)`` over seeds for each metric."""
    header = ["method"] + [f"{TASK_LABEL[task]} {m}" for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"]] + [format_stats(row["stats"][task][m]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gain_table(rows, task) -> str:
    """Markdown: per-seed gains over the method's own stage one, flagged when not significant."""
    header = ["method (gain over its stage one)"] + [f"Δ {TASK_LABEL[task]} {m}" for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row["method"] == "stage_one":
            continue
        cells = [row["label"]] + [format_gain(row["gain"][task][m]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _kind(run: Run) -> str:
    if run.method == "stage_one":
        return "stage one (train + eval)"
    return "post-hoc (eval only)" if run.eval_only else "stage two (train + eval)"


def timing_table(runs) -> str:
    """Wall and CPU time per kind of run: the numbers to size schedules and presets with (CPU
    seconds depend much less than wall time on what else the machine is doing)."""
    kinds = OrderedDict()
    for r in runs:
        if r.wall_s is not None:
            kinds.setdefault(_kind(r), []).append(r)
    lines = [
        "| runs | count | wall mean (s) | wall min–max (s) | CPU mean (s) | CPU total (s) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, rs in kinds.items():
        walls = [r.wall_s for r in rs]
        cpus = [r.cpu_s for r in rs if r.cpu_s is not None]
        cpu_mean = f"{sum(cpus) / len(cpus):.0f}" if cpus else "n/a"
        cpu_total = f"{sum(cpus):.0f}" if cpus else "n/a"
        lines.append(
            f"| {kind} | {len(rs)} | {sum(walls) / len(walls):.0f} | {min(walls):.0f}–"
            f"{max(walls):.0f} | {cpu_mean} | {cpu_total} |"
        )
    return "\n".join(lines)


def mean_table(rows) -> str:
    """Compact table of the means (the report's format)."""
    means = []
    for row in rows:
        res = {t: {m: row["stats"][t][m]["mean"] for m in METRICS} for t in TASKS}
        res = {
            t: {m: (float("nan") if v is None else v) for m, v in d.items()} for t, d in res.items()
        }
        means.append((row["label"], res))
    return metrics_table(means)


@dataclass
class DatasetInfo:
    """What the per-class analysis needs to know about the benchmark's data."""

    test_name: str
    gt_json: str
    class_names: List[str]
    instance_count: List[int]  # training instances per contiguous class
    frequency: List[str]  # r/c/f per contiguous class (training statistics)
    max_dets: int
    num_test_images: int = 0
    lvis_gt: object = field(default=None, repr=False)


def dataset_info(extra_opts: Sequence[str]) -> DatasetInfo:
    """Test set, its ground truth and the training class statistics of the benchmark's runs."""
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from disalign_det import add_disalign_config
    from disalign_det.data import register_datasets_from_cfg

    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.merge_from_file(os.path.join(SYNTH, STAGE_ONES["softmax"].config))
    cfg.merge_from_list(list(extra_opts))
    register_datasets_from_cfg(cfg)
    test = cfg.DATASETS.TEST[0]
    train = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    return DatasetInfo(
        test_name=test,
        gt_json=MetadataCatalog.get(test).json_file,
        class_names=list(train.thing_classes),
        instance_count=[int(n) for n in train.instance_count],
        frequency=list(train.class_frequency),
        max_dets=int(cfg.TEST.DETECTIONS_PER_IMAGE),
        num_test_images=len(DatasetCatalog.get(test)),
    )


_GT_LOCK = threading.Lock()


def run_per_class_ap(
    run: Run, info: DatasetInfo, task: str, max_dets: Optional[int] = None
) -> Optional[PerClassAP]:
    """Per-class AP (and the LVIS summary) of a finished run, from its saved detections.

    ``max_dets`` (default: the runs' TEST.DETECTIONS_PER_IMAGE) keeps each image's top-``max_dets``
    detections by score, as ``LVISResults`` does. A smaller value equals evaluating the model with
    TEST.DETECTIONS_PER_IMAGE = ``max_dets``: detectron2 applies NMS per class and cuts the
    score-sorted survivors last, so the top-k of the saved list is what the model would return.
    Cached in the run's folder (per_class_<task>[_dets<k>].json), recomputed when the results are
    newer.
    """
    max_dets = info.max_dets if max_dets is None else int(max_dets)
    suffix = "" if max_dets == info.max_dets else f"_dets{max_dets}"
    cache = os.path.join(run.out_dir, f"per_class_{task}{suffix}.json")
    results = os.path.join(run.out_dir, "inference", info.test_name, "lvis_instances_results.json")
    if not os.path.isfile(results):
        return None
    if os.path.isfile(cache) and os.path.getmtime(cache) >= os.path.getmtime(results):
        with open(cache) as f:
            d = json.load(f)
        if d.get("max_dets", max_dets) == max_dets:
            return PerClassAP(
                d["cat_ids"],
                [math.nan if v is None else v for v in d["ap"]],
                d["frequency"],
                d.get("summary", {}),
            )
    with _GT_LOCK:
        if info.lvis_gt is None:
            from lvis import LVIS

            info.lvis_gt = LVIS(info.gt_json)
        pc = lvis_per_class_ap(info.lvis_gt, results, task, max_dets=max_dets)
    with open(cache, "w") as f:
        json.dump(
            {
                "max_dets": max_dets,
                "cat_ids": pc.cat_ids,
                "ap": [None if math.isnan(a) else float(a) for a in pc.ap],
                "frequency": pc.frequency,
                "summary": {k: float(v) for k, v in pc.summary.items()},
            },
            f,
        )
    return pc


def lvis_like_budget(num_classes: int) -> int:
    """Detections per image that give ``num_classes`` classes LVIS v1's share of the per-image
    limit: 300 detections for 1203 classes (0.25 per class), at least 1."""
    return max(1, round(300 * num_classes / 1203))


def lvis_like_fixed_ap_k(num_images: int) -> int:
    """Fixed AP's detections kept per class (K) that give a test set of ``num_images`` images LVIS
    v1 val's share: K = 10,000 for its 19,809 images (about 0.5 per class and image), at least 1."""
    return max(1, round(10000 * num_images / 19809))


def fixed_ap_metrics(run: Run) -> Optional[dict]:
    """``{task: {metric: value}}`` of a run's Fixed AP (``metrics_final.json``'s ``bbox_fixed`` /
    ``segm_fixed``, written with TEST.LVIS_EVAL.FIXED_AP True), None if it has none."""
    if not run.metrics:
        return None
    out = {task: run.metrics.get(f"{task}_fixed") for task in TASKS}
    return out if all(out.values()) else None


def budget_metrics(run: Run, info: DatasetInfo, max_dets: int) -> Optional[dict]:
    """``{task: {metric: value in percent}}`` of a finished run re-evaluated at ``max_dets``
    detections per image (see :func:`run_per_class_ap`); -100 where LVIS reports undefined."""
    if not run.metrics:
        return None
    out = {}
    for task in TASKS:
        pc = run_per_class_ap(run, info, task, max_dets=max_dets)
        if pc is None or not pc.summary:
            return None
        out[task] = {m: float(pc.summary[m]) * 100 for m in METRICS if m in pc.summary}
    return out


def per_class_means(runs, info, task, stage_ones, methods=("stage_one", "disalign_box_mask")):
    """{stage one: {method: (K,) AP in percent averaged over seeds (NaN where undefined)}}."""
    import numpy as np

    out = {}
    for g in stage_ones:
        out[g] = {}
        for method in methods:
            aps = []
            for run in runs:
                if run.stage_one == g and run.method == method and run.metrics:
                    pc = run_per_class_ap(run, info, task)
                    if pc is not None:
                        by_id = dict(zip(pc.cat_ids, pc.ap))
                        aps.append(
                            [by_id.get(k + 1, math.nan) for k in range(len(info.class_names))]
                        )
            if aps:
                arr = np.asarray(aps, dtype=float) * 100
                with np.errstate(all="ignore"):
                    valid = (~np.isnan(arr)).sum(0)
                    mean = np.where(valid > 0, np.nansum(arr, 0) / np.maximum(valid, 1), np.nan)
                out[g][method] = {"mean": mean.tolist(), "num_seeds": len(aps)}
    return out
