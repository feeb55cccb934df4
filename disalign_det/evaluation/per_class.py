"""Per-category AP of an LVIS evaluation, and the per-class table every evaluation writes.

* :func:`per_class_ap_from_precision`: the AP of each category from the LVIS API's accumulated
  precision array, averaged exactly as ``LVISEval._summarize`` averages the whole array.
* :func:`lvis_per_class_ap` / :class:`PerClassAP`: run the LVIS API on a results list or json and
  keep every category's AP (used by the benchmarks and ``tools/plot_per_class.py``).
* :func:`per_class_rows` / :func:`write_per_class_table`: the table written next to
  ``metrics_final.json`` (``per_class_ap.json`` and ``per_class_ap.csv``): class name, r/c/f,
  training image and instance counts, box and mask AP (standard and, when computed, Fixed AP).
"""

import csv
import json
import logging
import math
import os
from typing import Dict, Optional, Sequence

import numpy as np

from ..compat import numpy_aliases

__all__ = [
    "per_class_ap_from_precision",
    "lvis_per_class_ap",
    "new_figure",
    "PerClassAP",
    "PER_CLASS_BASENAME",
    "per_class_rows",
    "per_class_table_for",
    "write_per_class_table",
    "read_per_class_table",
]

logger = logging.getLogger(__name__)

#: ``<OUTPUT_DIR>/per_class_ap.json`` and ``.csv``.
PER_CLASS_BASENAME = "per_class_ap"


def per_class_ap_from_precision(precision: np.ndarray, area_index: int = 0) -> np.ndarray:
    """(K,) AP of each category from an accumulated precision array, NaN where undefined.

    Args:
        precision: ``LVISEval.eval["precision"]``, shape (T, R, K, A) in the lvis API (IoU
            thresholds, recall thresholds, categories, area ranges), or (T, R, K, A, M) as in
            pycocotools (M: max-detection settings, the last, i.e. largest, is used). Entries are
            -1 where a category has no ground truth (or was not evaluated).
        area_index: area range; 0 is "all", the one AP / APr / APc / APf use.

    Returns:
        float64 array: for category k, the mean of the valid (> -1) entries of
        ``precision[:, :, k, area_index]``, exactly as ``LVISEval._summarize`` averages them, or NaN
        when there is none. For the lvis API a category is either wholly valid or wholly -1, so the
        mean of the non-NaN values equals the overall AP, and the mean over one frequency bucket
        equals APr / APc / APf.
    """
    p = np.asarray(precision, dtype=np.float64)
    if p.ndim == 5:
        p = p[..., -1]
    if p.ndim != 4:
        raise ValueError(f"precision must have 4 (T, R, K, A) or 5 dims, got shape {p.shape}")
    p = p[:, :, :, area_index]  # (T, R, K)
    out = np.full(p.shape[2], np.nan)
    for k in range(p.shape[2]):
        # np.mean of the valid entries, the very reduction of LVISEval._summarize (a category's
        # AP is then bit-identical to the API's AP restricted to that category).
        s = p[:, :, k]
        s = s[s > -1]
        if s.size:
            out[k] = np.mean(s)
    return out


class PerClassAP:
    """Per-category AP of one evaluation.

    Attributes:
        cat_ids (list[int]): LVIS category ids, in the evaluator's (sorted) order.
        ap (np.ndarray): (K,) AP in [0, 1] per category, NaN if it has no ground truth.
        frequency (list[str]): 'r' / 'c' / 'f' of each category (from the ground-truth json, the
            grouping LVIS's APr / APc / APf use).
        summary (dict): the LVIS API's own results (AP, APr, ... in [0, 1], -1 if undefined).
    """

    def __init__(self, cat_ids, ap, frequency, summary):
        self.cat_ids = list(cat_ids)
        self.ap = np.asarray(ap, dtype=np.float64)
        self.frequency = list(frequency)
        self.summary = dict(summary)

    def bucket_mean(self, bucket: Optional[str] = None) -> float:
        """Mean AP over the categories of ``bucket`` ('r', 'c', 'f'; None for all), NaN if none."""
        sel = np.array([bucket is None or f == bucket for f in self.frequency], dtype=bool)
        vals = self.ap[sel]
        vals = vals[~np.isnan(vals)]
        return float(vals.mean()) if len(vals) else float("nan")

    def as_dict(self) -> dict:
        """JSON-friendly: AP in percent (None where undefined), keyed by category id."""
        return {
            str(c): (None if np.isnan(a) else round(float(a) * 100, 4))
            for c, a in zip(self.cat_ids, self.ap)
        }


def lvis_per_class_ap(lvis_gt, results, iou_type: str, max_dets: int = 300) -> PerClassAP:
    """Run ``lvis.LVISEval`` and return the AP of every category.

    Args:
        lvis_gt: ``lvis.LVIS`` or the path of the ground-truth json.
        results: list of LVIS result dicts or the path of a results json (e.g. the evaluator's
            ``lvis_instances_results.json``, which holds box and mask of every detection).
        iou_type: "bbox" or "segm".
        max_dets: detections kept per image (the evaluation's ``TEST.DETECTIONS_PER_IMAGE``).

    For "segm" the results' boxes are dropped first, so that the LVIS API takes detection areas
    from the masks, as detectron2's evaluator does; otherwise the numbers would not match the
    segm AP it reports.
    """
    from lvis import LVIS, LVISEval, LVISResults

    if isinstance(lvis_gt, str):
        lvis_gt = LVIS(lvis_gt)
    if isinstance(results, str):
        with open(results) as f:
            results = json.load(f)
    else:
        results = [dict(r) for r in results]  # the LVIS API adds fields in place
    if iou_type == "segm":
        for r in results:
            r.pop("bbox", None)
    elif iou_type == "bbox":
        for r in results:
            # A box evaluation never reads the masks; dropping them saves the API's work on them.
            r.pop("segmentation", None)
    else:
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")

    cat_ids = sorted(lvis_gt.get_cat_ids())
    frequency = [c.get("frequency", "?") for c in lvis_gt.load_cats(cat_ids)]
    if not results:
        nan = np.full(len(cat_ids), np.nan)
        return PerClassAP(cat_ids, nan, frequency, {})
    # LVISResults warns "Assuming user provided the results in correct format" for every list it
    # is given: true by construction here, and noise in the benchmark's output, once per run.
    results_logger = logging.getLogger("lvis.results")
    level = results_logger.level
    results_logger.setLevel(logging.ERROR)
    try:
        dt = LVISResults(lvis_gt, results, max_dets=max_dets)
    finally:
        results_logger.setLevel(level)
    ev = LVISEval(lvis_gt, dt, iou_type)
    ev.params.max_dets = max_dets
    # lvis 0.5.3's accumulate() uses np.float (gone since numpy 1.24): set for this call only, so
    # that callers which did not apply the legacy shims (lab's tables, plot_per_class) work.
    with numpy_aliases():
        ev.run()
    if list(ev.params.cat_ids) != cat_ids:  # the API sorts them too; guard the assumption
        raise RuntimeError("LVISEval category order differs from the sorted category ids")
    ap = per_class_ap_from_precision(ev.eval["precision"])
    return PerClassAP(cat_ids, ap, frequency, ev.get_results())


def per_class_rows(
    cat_ids: Sequence[int],
    names: Sequence[str],
    frequency: Sequence[str],
    image_count: Optional[Sequence[int]],
    instance_count: Optional[Sequence[int]],
    ap_columns: Dict[str, Dict[int, float]],
) -> list:
    """One dict per category: the per-class table.

    Args:
        cat_ids: LVIS category ids, (K,).
        names, frequency: the category's name and 'r' / 'c' / 'f', (K,) each.
        image_count, instance_count: training images / instances of the category, (K,) each, or
            None when unknown (written as None / empty).
        ap_columns: column name (e.g. ``"bbox_AP"``) -> {category id: AP in percent, NaN where the
            category has no ground truth}. Categories missing from a column get None.

    Returns:
        list[dict]: keys ``category_id, name, frequency, train_image_count,
        train_instance_count`` then the AP columns in the given order; AP None where undefined.
    """
    rows = []
    for k, cat in enumerate(cat_ids):
        row = {
            "category_id": int(cat),
            "name": names[k],
            "frequency": frequency[k],
            "train_image_count": None if image_count is None else int(image_count[k]),
            "train_instance_count": None if instance_count is None else int(instance_count[k]),
        }
        for column, values in ap_columns.items():
            ap = values.get(int(cat))
            row[column] = None if ap is None or math.isnan(ap) else float(ap)
        rows.append(row)
    return rows


def per_class_table_for(lvis_gt, per_class, train_counts=None, to_dataset_category=None):
    """The per-class table of one evaluation.

    Args:
        lvis_gt (lvis.LVIS): the evaluation's ground truth (names and r/c/f of its categories).
        per_class (dict): task (``"bbox"``, ``"segm"``, ``"bbox_fixed"``...) -> {category id: AP
            in percent}; each task becomes the column ``<task>_AP``.
        train_counts (tuple or None): ``(image_count, instance_count)`` lists indexed by the
            model's contiguous class (the training set's metadata); None: the ``image_count`` /
            ``instance_count`` fields of ``lvis_gt``'s categories (LVIS's jsons carry the training
            counts there), or None where absent.
        to_dataset_category (callable or None): contiguous class -> category id (default k + 1).
    """
    cat_ids = sorted(lvis_gt.get_cat_ids())
    cats = lvis_gt.load_cats(cat_ids)
    image_count = instance_count = None
    if train_counts is not None:
        to_id = to_dataset_category or (lambda k: k + 1)
        by_id = {to_id(k): (a, b) for k, (a, b) in enumerate(zip(*train_counts))}
        if set(by_id) >= set(cat_ids):
            image_count = [by_id[c][0] for c in cat_ids]
            instance_count = [by_id[c][1] for c in cat_ids]
        else:
            logger.warning(
                "Training counts cover %d classes, the evaluation %d: taking them from the "
                "evaluation json instead",
                len(by_id),
                len(cat_ids),
            )
    if image_count is None and all("image_count" in c and "instance_count" in c for c in cats):
        image_count = [c["image_count"] for c in cats]
        instance_count = [c["instance_count"] for c in cats]
    columns = {f"{task}_AP": values for task, values in per_class.items()}
    return per_class_rows(
        cat_ids,
        [c.get("name", str(c["id"])) for c in cats],
        [c.get("frequency", "?") for c in cats],
        image_count,
        instance_count,
        columns,
    )


def new_figure(figsize):
    """A matplotlib ``Figure`` of ``figsize`` inches for a per-class plot, or None (logged) when
    matplotlib is not installed: the table is the result, the plot a convenience. Built without
    pyplot, so the evaluators neither pick a backend for the user's process nor keep figures."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed: per-class plot not drawn")
        return None
    return Figure(figsize=figsize)


def write_per_class_table(output_dir: str, rows: list, basename: str = PER_CLASS_BASENAME) -> list:
    """Write ``rows`` (:func:`per_class_rows`) as ``<basename>.json`` and ``<basename>.csv``.

    Returns the two paths. The CSV leaves undefined values empty.
    """
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, basename + ".json")
    csv_path = os.path.join(output_dir, basename + ".csv")
    with open(json_path, "w") as f:
        json.dump(rows, f, indent=1)
    columns = list(rows[0].keys()) if rows else ["category_id"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    logger.info(
        "Per-class AP of %d categories written to %s and %s", len(rows), json_path, csv_path
    )
    return [json_path, csv_path]


def read_per_class_table(path: str) -> list:
    """Rows of a per-class table: ``per_class_ap.json``, or the directory holding it."""
    if os.path.isdir(path):
        path = os.path.join(path, PER_CLASS_BASENAME + ".json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No per-class table at {path!r}: every evaluation writes {PER_CLASS_BASENAME}.json "
            "next to metrics_final.json (OUTPUT_DIR)"
        )
    with open(path) as f:
        return json.load(f)
