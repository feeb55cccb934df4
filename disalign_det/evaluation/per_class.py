"""Per-category AP of an LVIS evaluation, from the LVIS API's accumulated precision array.

* :func:`per_class_ap_from_precision`: the AP of each category, averaged exactly as
  ``LVISEval._summarize`` averages the whole array;
* :func:`lvis_per_class_ap` / :class:`PerClassAP`: run the LVIS API on a results list or json and
  keep every category's AP (used by the benchmarks' per-class plots).
"""

import json
import logging
from typing import Optional

import numpy as np

__all__ = ["PerClassAP", "lvis_per_class_ap", "per_class_ap_from_precision"]

logger = logging.getLogger(__name__)


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
    valid = p > -1
    num = np.where(valid, p, 0.0).sum(axis=(0, 1))
    den = valid.sum(axis=(0, 1))
    out = np.full(p.shape[2], np.nan)
    np.divide(num, den, out=out, where=den > 0)
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
    ev.run()
    if list(ev.params.cat_ids) != cat_ids:  # the API sorts them too; guard the assumption
        raise RuntimeError("LVISEval category order differs from the sorted category ids")
    ap = per_class_ap_from_precision(ev.eval["precision"])
    return PerClassAP(cat_ids, ap, frequency, ev.get_results())
