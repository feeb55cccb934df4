"""A vectorised ``LVISEval`` with bit-identical numbers (``TEST.LVIS_EVAL.BACKEND "fast"``).

The LVIS API spends its time in Python bookkeeping, not in arithmetic: ``evaluate_img`` runs for
every (category, area range, image) triple with a detection or a ground truth and builds a dict of
small arrays for each; ``accumulate`` walks ``categories x area ranges x images`` (95M list entries
on LVIS val, most of them ``None``) to gather them again. :class:`FastLVISEval` keeps every step of
the API that decides a number and replaces only that bookkeeping:

* ``_prepare`` (federated filtering, masks), ``compute_iou`` (pycocotools) and ``summarize`` are
  the API's own methods, unchanged;
* the greedy matching runs only for (image, category) pairs that have both ground truth and
  detections, once per distinct ground-truth ignore pattern (area ranges that ignore the same
  objects share it), and follows ``evaluate_img`` decision by decision (same visiting order, same
  ``<`` comparisons, same tie rule: among equal IoUs the last object in order wins);
* a detection of a pair without ground truth is never matched; it is ignored in an area range
  exactly where ``evaluate_img`` ignores it (area outside the range, or its category not
  exhaustively annotated in its image) -- computed for all of them at once;
* ``accumulate`` sorts each category's detections once with the API's order (decreasing score,
  ties by image order then by the results' order, which is what its two stable sorts give) and
  computes precision and recall with the same float operations, vectorised over IoU thresholds
  (the right-to-left running maximum of precision is ``np.maximum.accumulate``: max is exact).

``tests/test_lvis_evaluation.py`` checks the precision and recall arrays and every metric for
equality (``==``, not closeness) with ``lvis.LVISEval``.
"""

import logging

import numpy as np
from lvis import LVIS, LVISResults

from .lean_eval import LeanLVISEval

__all__ = ["FastLVISEval", "lean_lvis_results"]

logger = logging.getLogger(__name__)


def _greedy_match(ious, gt_ignore, thresholds):
    """``evaluate_img``'s matching for one (image, category, ignore pattern).

    Args:
        ious: (D, G) nested list, detections by decreasing score, objects in the API's order
            (not ignored first).
        gt_ignore: (G,) list of 0/1 in that order.
        thresholds: (T,) IoU thresholds.

    Returns:
        (matched, matched_ignored): two (T, D) bool arrays -- detection matched; matched to an
        ignored object.
    """
    num_dt, num_gt = len(ious), len(gt_ignore)
    matched = np.zeros((len(thresholds), num_dt), dtype=bool)
    on_ignored = np.zeros((len(thresholds), num_dt), dtype=bool)
    for t, thr in enumerate(thresholds):
        taken = [False] * num_gt
        for d in range(num_dt):
            row = ious[d]
            iou = min([thr, 1 - 1e-10])
            m = -1
            for g in range(num_gt):
                if taken[g]:
                    continue
                if m > -1 and gt_ignore[m] == 0 and gt_ignore[g] == 1:
                    break
                if row[g] < iou:
                    continue
                iou = row[g]
                m = g
            if m == -1:
                continue
            taken[m] = True
            matched[t, d] = True
            on_ignored[t, d] = gt_ignore[m] == 1
    return matched, on_ignored


class FastLVISEval(LeanLVISEval):
    """``lvis.LVISEval`` with the same ``eval["precision"]``, ``eval["recall"]`` and results, fast.

    ``eval_imgs`` (the per-triple dicts) is not built; ``eval["dt_pointers"]`` is not filled.
    """

    def evaluate(self):
        """Per-detection match flags for every IoU threshold and area range."""
        if not self.params.use_cats:
            return super().evaluate()
        p = self.params
        self.logger.info("Running per image evaluation (vectorised).")
        p.img_ids = list(np.unique(p.img_ids))
        self._prepare()
        thresholds = [float(t) for t in p.iou_thrs]
        area_rng = [tuple(a) for a in p.area_rng]
        num_t, num_a = len(thresholds), len(area_rng)
        cat_index = {c: k for k, c in enumerate(p.cat_ids)}
        img_rank = {i: r for r, i in enumerate(p.img_ids)}

        # Ground truth: objects counted per (category, area range).
        num_gt = np.zeros((len(p.cat_ids), num_a), dtype=np.int64)
        for (img_id, cat_id), gts in self._gts.items():
            k = cat_index[cat_id]
            for g in gts:
                for a, (lo, hi) in enumerate(area_rng):
                    if not (g["ignore"] or g["area"] < lo or g["area"] > hi):
                        num_gt[k, a] += 1

        cats, ranks, ids, scores, areas, not_exh = [], [], [], [], [], []
        matched_blocks, ignored_blocks, block_offsets = [], [], []
        for (img_id, cat_id), dts in self._dts.items():
            if not dts:
                continue
            order = np.argsort([-d["score"] for d in dts], kind="mergesort")
            dts = [dts[i] for i in order]
            start = len(ids)
            for d in dts:
                cats.append(cat_index[cat_id])
                ranks.append(img_rank[img_id])
                ids.append(d["id"])
                scores.append(d["score"])
                areas.append(d["area"])
                not_exh.append(d["category_id"] in self.img_nel[d["image_id"]])
            gts = self._gts.get((img_id, cat_id))
            if gts:
                m, ig = self._match_pair(img_id, cat_id, gts, len(dts), thresholds, area_rng)
                matched_blocks.append(m)
                ignored_blocks.append(ig)
                block_offsets.append(start)

        n = len(ids)
        self._dt_cat = np.asarray(cats, dtype=np.int64)
        self._dt_rank = np.asarray(ranks, dtype=np.int64)
        self._dt_id = np.asarray(ids, dtype=np.int64)
        self._dt_score = np.asarray(scores, dtype=np.float64)
        areas = np.asarray(areas, dtype=np.float64)
        not_exh = np.asarray(not_exh, dtype=bool)
        # (N, A): where an unmatched detection is ignored (evaluate_img's dt_ig_mask).
        out_of_range = np.stack(
            [(areas < lo) | (areas > hi) for lo, hi in area_rng], axis=1
        ).reshape(n, num_a)
        unmatched_ignored = out_of_range | not_exh[:, None]
        # (N, T, A) flags, default: never matched.
        self._dt_matched = np.zeros((n, num_t, num_a), dtype=bool)
        self._dt_ignored = np.repeat(unmatched_ignored[:, None, :], num_t, axis=1)
        for start, m, ig in zip(block_offsets, matched_blocks, ignored_blocks):
            sl = slice(start, start + m.shape[0])
            self._dt_matched[sl] = m
            # Matched: ignored iff its object is; unmatched: the mask above.
            self._dt_ignored[sl] = np.where(m, ig, self._dt_ignored[sl])
        self._num_gt = num_gt
        self.eval_imgs = None

    def _match_pair(self, img_id, cat_id, gts, num_dt, thresholds, area_rng):
        """(D, T, A) matched and matched-to-ignored flags of one pair's sorted detections."""
        ious_all = self.ious_for(img_id, cat_id)  # (D, G), G in the original order
        out_m = np.zeros((num_dt, len(thresholds), len(area_rng)), dtype=bool)
        out_ig = np.zeros_like(out_m)
        cache = {}
        for a, (lo, hi) in enumerate(area_rng):
            ignore = [1 if (g["ignore"] or g["area"] < lo or g["area"] > hi) else 0 for g in gts]
            key = tuple(ignore)
            if key not in cache:
                gt_idx = np.argsort(ignore, kind="mergesort")
                ious = ious_all[:, gt_idx].tolist()
                cache[key] = _greedy_match(ious, [ignore[i] for i in gt_idx], thresholds)
            m, ig = cache[key]
            out_m[:, :, a] = m.T
            out_ig[:, :, a] = ig.T
        return out_m, out_ig

    def ious_for(self, img_id, cat_id):
        """(D, G) IoUs of the pair, detections by decreasing score (``compute_iou``)."""
        ious = self.compute_iou(img_id, cat_id)
        return np.asarray(ious, dtype=np.float64).reshape(len(self._dts[img_id, cat_id]), -1)

    def accumulate(self):
        """``LVISEval.accumulate`` over the flags of :meth:`evaluate`, same floats."""
        if not self.params.use_cats or not hasattr(self, "_dt_matched"):
            return super().accumulate()
        p = self.params
        num_t, num_r = len(p.iou_thrs), len(p.rec_thrs)
        num_k, num_a = len(p.cat_ids), len(p.area_rng)
        precision = -np.ones((num_t, num_r, num_k, num_a))
        recall = -np.ones((num_t, num_k, num_a))
        rec_thrs = p.rec_thrs

        # The API's order within a category: decreasing score (mergesort over the images'
        # concatenation), i.e. ties by image order, then by each image's own stable order.
        order = np.lexsort((self._dt_id, self._dt_rank, -self._dt_score, self._dt_cat))
        cats = self._dt_cat[order]
        bounds = np.searchsorted(cats, np.arange(num_k + 1))
        for k in range(num_k):
            sel = order[bounds[k] : bounds[k + 1]]
            for a in range(num_a):
                n_gt = int(self._num_gt[k, a])
                if n_gt == 0:
                    continue
                dt_m = self._dt_matched[sel, :, a].T  # (T, D)
                dt_ig = self._dt_ignored[sel, :, a].T
                tps = np.logical_and(dt_m, np.logical_not(dt_ig))
                fps = np.logical_and(np.logical_not(dt_m), np.logical_not(dt_ig))
                tp_sum = np.cumsum(tps, axis=1).astype(dtype=float)
                fp_sum = np.cumsum(fps, axis=1).astype(dtype=float)
                num_tp = tp_sum.shape[1]
                if num_tp == 0:
                    recall[:, k, a] = 0
                    precision[:, :, k, a] = 0.0
                    continue
                rc = tp_sum / n_gt
                recall[:, k, a] = rc[:, -1]
                pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
                for t in range(num_t):
                    idx = np.searchsorted(rc[t], rec_thrs, side="left")
                    row = np.zeros(num_r)
                    ok = idx < num_tp
                    row[ok] = pr[t, idx[ok]]
                    precision[t, :, k, a] = row
        self.eval = {
            "params": p,
            "counts": [num_t, num_r, num_k, num_a],
            "precision": precision,
            "recall": recall,
        }


def lean_lvis_results(lvis_gt, results, max_dets):
    """``LVISResults(lvis_gt, results, max_dets)`` without deep-copying the ground truth's
    annotations (``LVISResults`` deep-copies the whole ground-truth dataset, then replaces its
    annotations by the results: only images and categories of the copy are ever used)."""
    shell = LVIS.__new__(LVIS)  # an LVIS whose dataset has no annotations; nothing else is read
    shell.dataset = {k: v for k, v in lvis_gt.dataset.items() if k != "annotations"}
    shell.dataset["annotations"] = []
    return LVISResults(shell, results, max_dets=max_dets)
