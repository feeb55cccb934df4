"""LVIS evaluation on arrays, bit-identical to the LVIS API (``TEST.LVIS_EVAL.BACKEND "fast"``).

The LVIS API spends its time in Python bookkeeping, not in arithmetic: ``LVISResults`` and
``_prepare`` touch every result dict several times, ``evaluate_img`` builds a dict of small arrays
for every (category, area range, image) triple with a detection or a ground truth, and
``accumulate`` walks ``categories x area ranges x images`` (95M list entries on LVIS val, most of
them ``None``) to gather them again. This module computes the same numbers from arrays:

* :mod:`.fast_lvis_inputs`: ``GroundTruthArrays`` is what ``_prepare`` derives from the ground
  truth (objects per (image, category), their areas and ignore flags, the federated "verified"
  and not-exhaustive (image, category) sets, r/c/f groups), built once per ``lvis.LVIS`` object;
  ``inputs_from_results`` / ``inputs_from_shards`` are ``LVISResults`` + ``_prepare`` for
  detections: the per-image top-k cut (stable sort by decreasing score), unknown categories,
  ``0 < area < inf`` and the federated filter, from result dicts or straight from the shards;
* :class:`FastLVISEval` matches and accumulates:

  - box IoUs are pycocotools' ``bbIou`` written with the same float operations over all
    (detection, object) pairs at once; mask IoUs come from pycocotools itself, one call per
    (image, category) pair;
  - the greedy matching of ``evaluate_img`` runs for all (pair, area range, IoU threshold)
    "lanes" at once, one detection rank per step, with the API's decisions (among the objects
    still free with IoU >= threshold, the not-ignored ones first; among equal IoUs the last object
    wins); a pair whose IoUs hold a NaN (which the API's ``<`` comparisons treat specially) is
    matched by a literal transcription of the API's loop instead;
  - ``accumulate`` sorts each category's detections once in the API's order (decreasing score,
    ties by image, then by the results' order) and computes precision and recall with the same
    float operations (the right-to-left running maximum of precision is
    ``np.maximum.accumulate``: max is exact);
  - ``summarize`` and ``print_results`` are the API's own methods.

``tests/test_fast_lvis_eval.py`` checks precision, recall and every metric for equality (``==``,
not closeness) with ``lvis.LVISEval`` on hand-made corner cases (score ties, ignored and
not-exhaustive objects, boxes without area, unknown categories, NaN IoUs, repeated images) and on
generated data; ``tests/test_lvis_evaluation.py`` does it through the streaming evaluator.
"""

import logging
from collections import OrderedDict

import numpy as np
import pycocotools.mask as mask_utils
from lvis import LVISEval
from lvis.eval import Params

from .fast_lvis_inputs import GroundTruthArrays, inputs_from_results, inputs_from_shards

__all__ = ["FastLVISEval", "box_iou"]

logger = logging.getLogger(__name__)


def box_iou(dt, gt):
    """pycocotools' ``bbIou`` (no crowd) for aligned rows: (M, 4) xywh, (M, 4) xywh -> (M,).

    The same float operations in the same order (``fmin``/``fmax`` as in C), so the same bits.
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        da = dt[:, 2] * dt[:, 3]
        ga = gt[:, 2] * gt[:, 3]
        w = np.fmin(dt[:, 2] + dt[:, 0], gt[:, 2] + gt[:, 0]) - np.fmax(dt[:, 0], gt[:, 0])
        h = np.fmin(dt[:, 3] + dt[:, 1], gt[:, 3] + gt[:, 1]) - np.fmax(dt[:, 1], gt[:, 1])
        inter = w * h
        iou = inter / (da + ga - inter)
    # C: "if(w<=0) continue; ... if(h<=0) continue;" leaves 0 (NaN fails both tests: kept).
    return np.where((w <= 0) | (h <= 0), 0.0, iou)


def _greedy_match_literal(ious, gt_ignore, thresholds):
    """``evaluate_img``'s matching loop, transcribed: for pairs whose IoUs hold a NaN.

    Args:
        ious: (D, G) detections by decreasing score, objects in their order; gt_ignore: (G,) bool;
        thresholds: (T,).

    Returns:
        (matched, on_ignored): (D, T) bool each.
    """
    order = np.argsort(gt_ignore.astype(np.int64), kind="mergesort")  # not ignored first
    ious = ious[:, order].tolist()
    ig = gt_ignore[order].tolist()
    num_dt, num_gt = len(ious), len(ig)
    matched = np.zeros((num_dt, len(thresholds)), dtype=bool)
    on_ignored = np.zeros_like(matched)
    for t, thr in enumerate(thresholds):
        taken = [False] * num_gt
        for d in range(num_dt):
            iou = min([thr, 1 - 1e-10])
            m = -1
            for g in range(num_gt):
                if taken[g]:
                    continue
                if m > -1 and not ig[m] and ig[g]:
                    break
                if ious[d][g] < iou:
                    continue
                iou = ious[d][g]
                m = g
            if m == -1:
                continue
            taken[m] = True
            matched[d, t] = True
            on_ignored[d, t] = ig[m]
    return matched, on_ignored


def _match_lanes(iou, row_start, num_rows, ignore, thresholds):
    """Greedy matching of many pairs at once (one bucket of pairs with <= ``Gb`` objects).

    Args:
        iou: (R, Gb) IoUs of the bucket's detections (rows; a pair's rows are consecutive, by
            decreasing score) with their pair's objects (columns; padding: -1).
        row_start, num_rows: (P,) each pair's first row and number of detections, pairs sorted
            by decreasing ``num_rows``.
        ignore: (P, A, Gb) bool, each pair's objects ignored in each area range.
        thresholds: (T,) IoU thresholds, already capped at 1 - 1e-10.

    Returns:
        (matched, on_ignored): (R, A, T) bool each.
    """
    num_pairs, num_areas, gb = ignore.shape
    num_t = len(thresholds)
    thr = np.asarray(thresholds, dtype=np.float64)[None, None, :, None]
    ign = ignore[:, :, None, :]  # (P, A, 1, Gb)
    taken = np.zeros((num_pairs, num_areas, num_t, gb), dtype=bool)
    matched = np.zeros((iou.shape[0], num_areas, num_t), dtype=bool)
    on_ignored = np.zeros_like(matched)
    neg_rows = -np.asarray(num_rows)  # ascending
    for d in range(int(num_rows[0]) if num_pairs else 0):
        active = int(np.searchsorted(neg_rows, -d, side="left"))  # pairs with num_rows > d
        rows = row_start[:active] + d
        v = iou[rows][:, None, None, :]  # (P', 1, 1, Gb)
        ok = ~taken[:active] & (v >= thr)  # free objects at or above the threshold
        ig = ign[:active]
        # Not-ignored candidates first: the API breaks out of its loop at the first ignored
        # object once it holds a not-ignored match, and only reaches ignored ones otherwise.
        has_regular = (ok & ~ig).any(-1, keepdims=True)
        use = ok & (ig != has_regular)
        vals = np.where(use, v, -np.inf)
        best = vals.max(-1, keepdims=True)
        found = use.any(-1)  # (P', A, T)
        # Among equal best IoUs the API keeps the last one ("<" lets ties through).
        last = gb - 1 - np.argmax((use & (vals == best))[..., ::-1], axis=-1)
        hit = np.nonzero(found)
        taken[:active][hit + (last[hit],)] = True
        matched[rows] = found
        on_ignored[rows] = (
            found
            & np.take_along_axis(np.broadcast_to(ig, use.shape), last[..., None], axis=-1)[..., 0]
        )
    return matched, on_ignored


class FastLVISEval(LVISEval):
    """``lvis.LVISEval`` on arrays: same ``eval["precision"]``, ``eval["recall"]`` and results.

    Build it with :meth:`from_results` (a list of LVIS result dicts, as for ``LVISEval``) or
    directly from arrays (what the streaming evaluator does from its shards). ``run()``,
    ``summarize()``, ``print_results()`` and ``get_results()`` behave as the API's;
    ``eval_imgs`` and ``eval["dt_pointers"]`` are not built.

    Args:
        lvis_gt (lvis.LVIS): the ground truth.
        iou_type (str): "bbox" or "segm".
        key (N,): pair keys of the evaluated detections
            (:func:`.fast_lvis_inputs.select_detections`).
        score (N,), order (N,): scores and the detections' order in the results (ties).
        area (N,): areas (box ``w * h`` or mask area, as ``LVISResults`` sets them).
        box (N, 4) xywh for "bbox"; rles (list of N RLE dicts) for "segm".

    Like ``LVISEval``, ``params.max_dets`` stays 300 whatever cut was applied (it only names the
    AR keys; the caller sets it for no cap).
    """

    def __init__(self, lvis_gt, iou_type, key, score, order, area, *, box=None, rles=None):
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_type: {iou_type} is not supported.")
        self.logger = logging.getLogger("lvis.eval")
        self.lvis_gt = lvis_gt
        self.gt = GroundTruthArrays.of(lvis_gt)
        self.params = Params(iou_type=iou_type)
        self.params.img_ids = self.gt.img_ids.tolist()
        self.params.cat_ids = self.gt.cat_ids.tolist()
        self.results = OrderedDict()
        self.eval = {}
        self.eval_imgs = None
        self.freq_groups = [
            np.flatnonzero(self.gt.frequency == f).tolist() for f in self.params.img_count_lbl
        ]
        # Detections in pair order: by key, then decreasing score, then the results' order
        # (compute_iou's stable sort of each pair's detections, which are in results order).
        key = np.asarray(key, dtype=np.int64)
        score = np.asarray(score, dtype=np.float64)
        order = np.asarray(order, dtype=np.int64)
        perm = np.lexsort((order, -score, key))
        self._key, self._score, self._order = key[perm], score[perm], order[perm]
        self._area = np.asarray(area, dtype=np.float64)[perm]
        self._box = None if box is None else np.asarray(box, np.float64).reshape(-1, 4)[perm]
        self._rles = None if rles is None else [rles[i] for i in perm.tolist()]
        if iou_type == "bbox" and self._box is None or iou_type == "segm" and self._rles is None:
            raise ValueError(
                f"{iou_type} evaluation needs {'box' if iou_type == 'bbox' else 'rles'}"
            )

    @classmethod
    def from_results(cls, lvis_gt, results, iou_type, max_dets=300):
        """From LVIS result dicts, exactly as ``LVISEval(lvis_gt, LVISResults(lvis_gt, results,
        max_dets), iou_type)`` would see them (:func:`.fast_lvis_inputs.inputs_from_results`)."""
        inputs = inputs_from_results(GroundTruthArrays.of(lvis_gt), results, iou_type, max_dets)
        return cls(lvis_gt, iou_type, **inputs)

    @classmethod
    def from_shards(cls, lvis_gt, paths, iou_type, max_dets=300, positions=None):
        """From the streaming evaluator's shard files, without building a result dict
        (:func:`.fast_lvis_inputs.inputs_from_shards`); None when a score is NaN (the API's sort
        is then order-dependent: the caller falls back to the LVIS API)."""
        gt = GroundTruthArrays.of(lvis_gt)
        inputs = inputs_from_shards(gt, paths, iou_type, max_dets, positions)
        return None if inputs is None else cls(lvis_gt, iou_type, **inputs)

    # -------------------------------------------------------------------------------- evaluate
    def evaluate(self):
        """Match every detection at every IoU threshold and area range."""
        gt = self.gt
        p = self.params
        self.logger.info("Running per image evaluation (arrays).")
        thresholds = [min([float(t), 1 - 1e-10]) for t in p.iou_thrs]
        area_rng = np.asarray(p.area_rng, dtype=np.float64)  # (A, 2)
        num_t, num_a, num_k = len(thresholds), len(area_rng), gt.num_cats
        n = len(self._key)

        # Objects counted per (category, area range): not ignored and inside the range.
        g_cat = gt.key % num_k
        g_out = (gt.area[:, None] < area_rng[:, 0]) | (gt.area[:, None] > area_rng[:, 1])
        g_ignore = gt.ignore[:, None] | g_out  # (G, A)
        num_gt = np.zeros((num_k, num_a), dtype=np.int64)
        for a in range(num_a):
            num_gt[:, a] = np.bincount(g_cat[~g_ignore[:, a]], minlength=num_k)
        self._num_gt = num_gt

        # Unmatched detections are ignored outside the area range or where the category is not
        # exhaustively annotated in the image (evaluate_img's dt_ig_mask).
        d_out = (self._area[:, None] < area_rng[:, 0]) | (self._area[:, None] > area_rng[:, 1])
        nel = np.isin(self._key, gt.not_exhaustive)
        unmatched_ignored = d_out | nel[:, None]  # (N, A)
        matched = np.zeros((n, num_a, num_t), dtype=bool)
        on_ignored = np.zeros((n, num_a, num_t), dtype=bool)

        # Pairs: runs of equal keys among the detections; their objects by searchsorted.
        starts = np.flatnonzero(np.r_[True, self._key[1:] != self._key[:-1]]) if n else []
        starts = np.asarray(starts, dtype=np.int64)
        d_count = np.diff(np.r_[starts, n]).astype(np.int64)
        pair_key = self._key[starts]
        g_lo = np.searchsorted(gt.key, pair_key, side="left")
        g_count = np.searchsorted(gt.key, pair_key, side="right") - g_lo
        both = np.flatnonzero(g_count > 0)
        if len(both):
            pairs = (starts[both], d_count[both], g_lo[both], g_count[both])
            self._match_pairs(pairs, g_ignore, thresholds, matched, on_ignored)
        # Matched: ignored iff its object is; unmatched: the mask above.
        ignored = np.where(matched, on_ignored, unmatched_ignored[:, :, None])
        self._dt_matched = matched
        self._dt_ignored = ignored

    def _pair_ious(self, d_start, d_count, g_lo, g_count):
        """IoUs of every (detection, object) combination of the given pairs, flat: for each pair,
        its (D, G) matrix in row-major order, pairs one after the other."""
        gt = self.gt
        if self.params.iou_type == "bbox":
            sizes = d_count * g_count
            total = int(sizes.sum())
            pair_of = np.repeat(np.arange(len(d_count)), sizes)
            local = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            d_idx = d_start[pair_of] + local // g_count[pair_of]
            g_idx = g_lo[pair_of] + local % g_count[pair_of]
            return box_iou(self._box[d_idx], gt.box[g_idx])
        gt_rles = gt.rles()
        out = []
        spans = zip(d_start.tolist(), d_count.tolist(), g_lo.tolist(), g_count.tolist())
        for ds, dc, gl, gc in spans:
            ious = mask_utils.iou(self._rles[ds : ds + dc], gt_rles[gl : gl + gc], [0] * gc)
            out.append(np.asarray(ious, dtype=np.float64).reshape(-1))
        return np.concatenate(out)

    def _match_pairs(self, pairs, g_ignore, thresholds, matched, on_ignored):
        """Fill ``matched`` / ``on_ignored`` (N, A, T) for pairs with detections and objects.

        ``pairs``: (first detection, number of detections, first object, number of objects), (P,)
        each.
        """
        d_start, d_count, g_lo, g_count = pairs
        flat = self._pair_ious(d_start, d_count, g_lo, g_count)
        sizes = d_count * g_count
        offsets = np.cumsum(sizes) - sizes
        nan_pair = np.add.reduceat(np.isnan(flat), offsets) > 0 if len(flat) else sizes > 0
        for i in np.flatnonzero(nan_pair).tolist():
            ious = flat[offsets[i] : offsets[i] + sizes[i]].reshape(d_count[i], g_count[i])
            rows = slice(d_start[i], d_start[i] + d_count[i])
            for a in range(g_ignore.shape[1]):
                ig = g_ignore[g_lo[i] : g_lo[i] + g_count[i], a]
                m, o = _greedy_match_literal(ious, ig, thresholds)
                matched[rows, a], on_ignored[rows, a] = m, o
        regular = np.flatnonzero(~nan_pair)
        # Buckets of pairs by object count (padded to a power of two): little padding, few steps.
        width = 1 << np.ceil(np.log2(np.maximum(g_count[regular], 1))).astype(np.int64)
        for gb in np.unique(width).tolist():
            sel = regular[width == gb]
            sel = sel[np.argsort(-d_count[sel], kind="stable")]
            dc, gc = d_count[sel], g_count[sel]
            rows_total = int(dc.sum())
            row_start = np.cumsum(dc) - dc
            # (R, Gb) IoUs padded with -1 (never at or above a threshold).
            iou = np.full((rows_total, gb), -1.0)
            r_pair = np.repeat(np.arange(len(sel)), dc)
            r_local = np.arange(rows_total) - row_start[r_pair]
            cells_r = np.repeat(np.arange(rows_total), gc[r_pair])
            cells_c = np.arange(len(cells_r)) - np.repeat(
                np.cumsum(gc[r_pair]) - gc[r_pair], gc[r_pair]
            )
            src = offsets[sel][r_pair] + r_local * gc[r_pair]
            iou[cells_r, cells_c] = flat[np.repeat(src, gc[r_pair]) + cells_c]
            # (P, A, Gb) object ignore flags per area range; padding: not ignored.
            ign = np.zeros((len(sel), g_ignore.shape[1], gb), dtype=bool)
            o_pair = np.repeat(np.arange(len(sel)), gc)
            o_col = np.arange(int(gc.sum())) - np.repeat(np.cumsum(gc) - gc, gc)
            o_idx = np.repeat(g_lo[sel], gc) + o_col
            ign[o_pair, :, o_col] = g_ignore[o_idx]
            m, o = _match_lanes(iou, row_start, dc, ign, thresholds)
            dest = np.repeat(d_start[sel], dc) + r_local
            matched[dest] = m
            on_ignored[dest] = o

    # ------------------------------------------------------------------------------ accumulate
    def accumulate(self):
        """``LVISEval.accumulate`` over the flags of :meth:`evaluate`, same floats."""
        p = self.params
        num_t, num_r = len(p.iou_thrs), len(p.rec_thrs)
        num_k, num_a = self.gt.num_cats, len(p.area_rng)
        precision = -np.ones((num_t, num_r, num_k, num_a))
        recall = -np.ones((num_t, num_k, num_a))
        rec_thrs = p.rec_thrs

        # The API's order within a category: decreasing score (mergesort over the images'
        # concatenation), ties by image order, then by each pair's own (results) order.
        cats = self._key % num_k
        ranks = self._key // num_k
        order = np.lexsort((self._order, ranks, -self._score, cats))
        bounds = np.searchsorted(cats[order], np.arange(num_k + 1))
        for k in np.flatnonzero(self._num_gt.any(axis=1)).tolist():
            sel = order[bounds[k] : bounds[k + 1]]
            num_tp = len(sel)
            n_gt = self._num_gt[k]  # (A,)
            if num_tp == 0:
                recall[:, k, n_gt > 0] = 0
                precision[:, :, k, n_gt > 0] = 0.0
                continue
            dt_m = self._dt_matched[sel].transpose(1, 2, 0)  # (A, T, D)
            dt_ig = self._dt_ignored[sel].transpose(1, 2, 0)
            tp_int = np.cumsum(dt_m & ~dt_ig, axis=2)
            fp_int = np.cumsum(~dt_m & ~dt_ig, axis=2)
            for a in np.flatnonzero(n_gt > 0).tolist():
                n = int(n_gt[a])
                tp_sum, fp_sum = tp_int[a].astype(dtype=float), fp_int[a].astype(dtype=float)
                rc = tp_sum / n
                recall[:, k, a] = rc[:, -1]
                pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
                # searchsorted(rc[t], rec_thrs, "left") for every t at once: rc[t, i] >= thr iff
                # tp[t, i] >= need(thr), the smallest j with j / n >= thr (j / n is monotone
                # in j, and the same division as rc's); integer keys can then be offset per row.
                need = np.searchsorted(np.arange(n + 1) / n, rec_thrs, side="left")
                stride = n + 2
                keys = (tp_int[a] + stride * np.arange(num_t)[:, None]).ravel()
                queries = need[None, :] + stride * np.arange(num_t)[:, None]  # (T, R)
                idx = (
                    np.searchsorted(keys, queries, side="left") - num_tp * np.arange(num_t)[:, None]
                )
                ok = idx < num_tp
                rows = np.zeros((num_t, num_r))
                t_idx = np.nonzero(ok)[0]
                rows[ok] = pr[t_idx, idx[ok]]
                precision[:, :, k, a] = rows
        self.eval = {
            "params": p,
            "counts": [num_t, num_r, num_k, num_a],
            "precision": precision,
            "recall": recall,
        }
