"""The metric backends of the LVIS evaluation (``TEST.LVIS_EVAL.BACKEND``): one table,
:data:`BACKENDS` (name -> :class:`Backend`), which every dispatch uses; :func:`get` validates a
name once, naming the config key. Adding a backend is one entry.

``"lvis"`` (default): the LVIS API (``lvis.LVISEval``, through
:class:`~disalign_det.evaluation.lvis_evaluation.LeanLVISEval`), the reference numbers.

``"fast"``: :class:`~disalign_det.evaluation.fast_lvis_eval.FastLVISEval`, the LVIS API with its
Python bookkeeping vectorised; bit-identical numbers (tested), several times faster.

``"faster_coco_eval"``: ``faster_coco_eval.COCOeval_faster`` (C++ matching and accumulation) with
``lvis_style=True`` (federated negatives / not-exhaustive handling, r/c/f groups). Its numbers are
*not* guaranteed identical to the LVIS API's: see ``docs/eval_backends.md`` for the measured
differences and speed. Differences of protocol handled here:

* the LVIS API caps detections per *image* (``LVISResults``), COCO-style ``maxDets`` per (image,
  category): the results given to this backend are already cut per image by the streaming
  evaluator (its federated loader applies ``LVISResults``' cut first), and ``maxDets`` is set to
  the largest number of results of one (image, category) pair, so it cuts nothing more;
* ``None`` segmentation placeholders of the box pass are removed (the LVIS API wants a key there,
  faster-coco-eval would try to read it).

The metric dict is computed from the backend's precision array exactly as ``LVISEval._summarize``
does (mean of the valid entries, -1 -> reported -100 where a group has no ground truth).
"""

import copy
import logging
from collections import Counter
from typing import Callable, NamedTuple, Optional

import numpy as np

from ..compat import numpy_aliases

__all__ = ["BACKENDS", "Backend", "get", "run_lvis_eval", "summarize_precision"]

logger = logging.getLogger(__name__)

#: The metrics detectron2's LVISEvaluator reports for each of "bbox" and "segm", in its order.
LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


class Backend(NamedTuple):
    """One metric backend.

    ``evaluate(lvis_gt, results, iou_type, max_dets_per_image)`` evaluates LVIS result dicts (cut
    at ``max_dets_per_image`` per image, -1: no cap) and returns ``(metrics, cat_ids, precision)``:
    the metrics in percent, the category ids in the precision array's order, and the precision
    array (T, R, K, A[, M]).

    ``evaluate_shards(lvis_gt, paths, iou_type, max_dets_per_image, positions)``, where not None,
    evaluates the streaming evaluator's shard files directly (no result dict is built) and returns
    the same triple, or None where it does not apply; the streaming evaluator then builds the
    result dicts and evaluates them with the reference backend, ``"lvis"``.
    """

    name: str
    evaluate: Callable
    evaluate_shards: Optional[Callable] = None


def run_lvis_eval(lvis_eval, max_dets_per_image):
    """Run a prepared ``LVISEval`` (or :class:`~.fast_lvis_eval.FastLVISEval`) whose results were
    cut at ``max_dets_per_image`` (-1: no cap), print its summary as the LVIS API does, and return
    ``(metrics in percent, cat_ids, precision)``."""
    logger.info("Evaluating with max detections per image = %d", max_dets_per_image)
    if max_dets_per_image < 0:
        lvis_eval.params.max_dets = max_dets_per_image  # only names the AR keys
    with numpy_aliases():  # the stock LVISEval's accumulate() uses np.float (see lean_eval.py)
        lvis_eval.run()
    lvis_eval.print_results()
    summary = lvis_eval.get_results()
    metrics = {metric: float(summary[metric] * 100) for metric in LVIS_METRICS}
    return metrics, lvis_eval.params.cat_ids, lvis_eval.eval["precision"]


def _evaluate_lvis(lvis_gt, results, iou_type, max_dets_per_image):
    from lvis import LVISResults

    from .lean_eval import LeanLVISEval

    results = LVISResults(lvis_gt, results, max_dets=max_dets_per_image)
    return run_lvis_eval(LeanLVISEval(lvis_gt, results, iou_type), max_dets_per_image)


def _evaluate_fast(lvis_gt, results, iou_type, max_dets_per_image):
    from .fast_lvis_eval import FastLVISEval

    lvis_eval = FastLVISEval.from_results(lvis_gt, results, iou_type, max_dets_per_image)
    return run_lvis_eval(lvis_eval, max_dets_per_image)


def _evaluate_fast_shards(lvis_gt, paths, iou_type, max_dets_per_image, positions):
    from .fast_lvis_eval import FastLVISEval

    lvis_eval = FastLVISEval.from_shards(lvis_gt, paths, iou_type, max_dets_per_image, positions)
    if lvis_eval is None:
        logger.warning(
            "NaN scores among the detections: the %s pass uses the LVIS API instead of the "
            "fast backend (its ordering of NaN scores is not reproduced)",
            iou_type,
        )
        return None
    return run_lvis_eval(lvis_eval, max_dets_per_image)


def summarize_precision(precision, iou_thrs, frequency):
    """LVIS metrics (in percent) from a precision array, as ``LVISEval._summarize`` computes them.

    Args:
        precision: (T, R, K, A) or (T, R, K, A, M) (last M used); -1 where undefined.
        iou_thrs: (T,) IoU thresholds; frequency: (K,) 'r' / 'c' / 'f' of each category.
    """
    p = np.asarray(precision, dtype=np.float64)
    if p.ndim == 5:
        p = p[..., -1]
    iou_thrs = np.asarray(iou_thrs)
    frequency = np.asarray(frequency)

    def mean(s):
        s = s[s > -1]
        return float(np.mean(s)) * 100 if s.size else -100.0

    out = {
        "AP": mean(p[:, :, :, 0]),
        "AP50": mean(p[np.isclose(iou_thrs, 0.5)][:, :, :, 0]),
        "AP75": mean(p[np.isclose(iou_thrs, 0.75)][:, :, :, 0]),
        "APs": mean(p[:, :, :, 1]),
        "APm": mean(p[:, :, :, 2]),
        "APl": mean(p[:, :, :, 3]),
    }
    for group in "rcf":
        out["AP" + group] = mean(p[:, :, frequency == group, 0])
    return {k: out[k] for k in LVIS_METRICS}


def _faster_gt(lvis_gt):
    """faster-coco-eval's ground truth for ``lvis_gt``, built once per LVIS object (it annotates
    the annotations in place, so it gets its own copy of the dataset)."""
    cached = getattr(lvis_gt, "_disalign_faster_gt", None)
    if cached is None:
        from faster_coco_eval import COCO

        cached = COCO(copy.deepcopy(lvis_gt.dataset))
        lvis_gt._disalign_faster_gt = cached
    return cached


def _evaluate_faster_coco_eval(lvis_gt, results, iou_type, max_dets_per_image):
    logger.info("Evaluating with max detections per image = %d", max_dets_per_image)
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError as e:
        raise ImportError(
            "TEST.LVIS_EVAL.BACKEND='faster_coco_eval' needs `pip install faster-coco-eval`"
        ) from e

    for r in results:
        if r.get("segmentation", 0) is None:
            del r["segmentation"]
    if max_dets_per_image >= 0:
        # Same per-image cut as LVISResults (stable sort by decreasing score), when the caller
        # has not made it already; then maxDets below cuts nothing more.
        per_image = Counter(r["image_id"] for r in results)
        if per_image and max(per_image.values()) > max_dets_per_image:
            from lvis.results import LVISResults

            results = LVISResults.limit_dets_per_image(None, results, max_dets_per_image)
    pair_counts = Counter((r["image_id"], r["category_id"]) for r in results)
    gt = _faster_gt(lvis_gt)
    dt = gt.loadRes(results)
    ev = COCOeval_faster(gt, dt, iou_type, lvis_style=True, print_function=logger.debug)
    ev.params.maxDets = [max(pair_counts.values())]
    ev.run()
    cat_ids = list(ev.params.catIds)
    frequency = [c["frequency"] for c in lvis_gt.load_cats(cat_ids)]
    precision = ev.eval["precision"]
    return summarize_precision(precision, ev.params.iouThrs, frequency), cat_ids, precision


#: name -> backend: "lvis" the LVIS API (the reference), "fast" bit-identical on arrays,
#: "faster_coco_eval" C++ (not identical; see the module docstring).
BACKENDS = {
    b.name: b
    for b in (
        Backend("lvis", _evaluate_lvis),
        Backend("fast", _evaluate_fast, _evaluate_fast_shards),
        Backend("faster_coco_eval", _evaluate_faster_coco_eval),
    )
}


def get(name):
    """The backend called ``name``; a ValueError naming the config key for an unknown one."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"TEST.LVIS_EVAL.BACKEND must be one of {tuple(BACKENDS)}, got {name!r}"
        ) from None
