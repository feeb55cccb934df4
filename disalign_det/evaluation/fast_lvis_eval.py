"""LVIS evaluation on arrays, bit-identical to the LVIS API (``TEST.LVIS_EVAL.BACKEND "fast"``).

The LVIS API spends its time in Python bookkeeping, not in arithmetic: ``LVISResults`` and
``_prepare`` touch every result dict several times, ``evaluate_img`` builds a dict of small arrays
for every (category, area range, image) triple with a detection or a ground truth, and
``accumulate`` walks ``categories x area ranges x images`` (95M list entries on LVIS val, most of
them ``None``) to gather them again. This module computes the same numbers from arrays:

* :class:`GroundTruthArrays` is what ``_prepare`` derives from the ground truth (objects per
  (image, category), their areas and ignore flags, the federated "verified" and not-exhaustive
  (image, category) sets, r/c/f groups), built once per ``lvis.LVIS`` object;
* :func:`select_detections` is ``LVISResults`` + ``_prepare`` for detections: the per-image top-k
  cut (stable sort by decreasing score), unknown categories, ``0 < area < inf`` and the federated
  filter, as boolean arrays;
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

from .shards import iter_shard

__all__ = [
    "FastLVISEval",
    "GroundTruthArrays",
    "detections_from_results",
    "per_image_top",
    "select_detections",
]

logger = logging.getLogger(__name__)

# Attribute under which an lvis.LVIS object keeps its GroundTruthArrays (built once).
_CACHE_ATTR = "_disalign_gt_arrays"


class GroundTruthArrays:
    """What ``LVISEval._prepare`` derives from an ``lvis.LVIS`` ground truth, as arrays.

    Objects are those ``_prepare`` loads (``get_ann_ids`` over all images and categories: a known
    category and ``0 < area < inf``), sorted by pair key ``image rank * K + category index``
    (stably: within a pair, in the API's order). Attributes:

    * ``img_ids`` (I,), ``cat_ids`` (K,): sorted, as ``params.img_ids`` / ``params.cat_ids``;
    * ``key`` (G,), ``area`` (G,), ``ignore`` (G,) bool, ``box`` (G, 4) xywh;
    * ``verified`` (V,) sorted pair keys ``_prepare`` keeps detections of (the image's negative
      categories and the categories of its loaded objects), ``not_exhaustive`` (E,) sorted keys;
    * ``frequency`` (K,) "r" / "c" / "f".
    """

    def __init__(self, lvis_gt):
        self.lvis_gt = lvis_gt
        img_ids = sorted(lvis_gt.get_img_ids())
        cat_ids = sorted(lvis_gt.get_cat_ids())
        if not cat_ids:
            raise ValueError("The LVIS ground truth has no categories")
        self.img_ids = np.asarray(img_ids, dtype=np.int64)
        self.cat_ids = np.asarray(cat_ids, dtype=np.int64)
        if self.img_ids.tolist() != img_ids or self.cat_ids.tolist() != cat_ids:
            raise ValueError("The fast LVIS backend needs integer image and category ids")
        num_cats = len(cat_ids)
        rank_of = {i: r for r, i in enumerate(img_ids)}
        index_of = {c: k for k, c in enumerate(cat_ids)}

        anns = lvis_gt.load_anns(lvis_gt.get_ann_ids(img_ids=img_ids, cat_ids=cat_ids))
        key = np.fromiter(
            (rank_of[a["image_id"]] * num_cats + index_of[a["category_id"]] for a in anns),
            dtype=np.int64,
            count=len(anns),
        )
        order = np.argsort(key, kind="stable")
        self._anns = [anns[i] for i in order]
        self.key = key[order]
        self.area = np.asarray([a["area"] for a in self._anns], dtype=np.float64)
        self.ignore = np.asarray([bool(a.get("ignore", 0)) for a in self._anns], dtype=bool)
        self.box = np.asarray([a["bbox"] for a in self._anns], dtype=np.float64).reshape(-1, 4)
        self._rles = None

        verified = [self.key]
        not_exhaustive = []
        for img in lvis_gt.load_imgs(img_ids):
            base = rank_of[img["id"]] * num_cats
            neg = [base + index_of[c] for c in img["neg_category_ids"] if c in index_of]
            nel = [base + index_of[c] for c in img["not_exhaustive_category_ids"] if c in index_of]
            verified.append(np.asarray(neg, dtype=np.int64))
            not_exhaustive.append(np.asarray(nel, dtype=np.int64))
        self.verified = np.unique(np.concatenate(verified))
        self.not_exhaustive = np.unique(np.concatenate(not_exhaustive or [np.zeros(0, np.int64)]))
        self.frequency = np.asarray([c["frequency"] for c in lvis_gt.load_cats(cat_ids)])
        # Per image: its verified category ids (not indices), for filtering while streaming.
        self._verified_cats = None

    @classmethod
    def of(cls, lvis_gt):
        """The arrays of ``lvis_gt``, built on first use and kept on the object."""
        cached = getattr(lvis_gt, _CACHE_ATTR, None)
        if cached is None:
            cached = cls(lvis_gt)
            setattr(lvis_gt, _CACHE_ATTR, cached)
        return cached

    @property
    def num_cats(self):
        return len(self.cat_ids)

    def rles(self):
        """(G,) the objects' masks as the API converts them (``ann_to_rle``), built once."""
        if self._rles is None:
            self._rles = [self.lvis_gt.ann_to_rle(a) for a in self._anns]
        return self._rles

    def image_rank(self, image_ids):
        """(N,) rank of each image id among ``img_ids``; -1 for an id the ground truth lacks."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        rank = np.searchsorted(self.img_ids, image_ids)
        rank = np.minimum(rank, len(self.img_ids) - 1)
        return np.where(self.img_ids[rank] == image_ids, rank, -1)

    def cat_index(self, cat_ids):
        """(N,) index of each category id among ``cat_ids``; -1 for an unknown one."""
        cat_ids = np.asarray(cat_ids, dtype=np.int64)
        index = np.minimum(np.searchsorted(self.cat_ids, cat_ids), self.num_cats - 1)
        return np.where(self.cat_ids[index] == cat_ids, index, -1)

    def verified_cats(self, image_id):
        """Sorted category ids whose detections ``_prepare`` keeps in ``image_id``; None for an
        image the ground truth does not have."""
        if self._verified_cats is None:
            ranks, cats = np.divmod(self.verified, self.num_cats)
            bounds = np.searchsorted(ranks, np.arange(len(self.img_ids) + 1))
            self._verified_cats = {
                int(i): self.cat_ids[cats[bounds[r] : bounds[r + 1]]]
                for r, i in enumerate(self.img_ids.tolist())
            }
        return self._verified_cats.get(image_id)


def per_image_top(image_ids, scores, max_dets):
    """(N,) bool, the detections ``LVISResults.limit_dets_per_image`` keeps.

    Per image: a stable sort by decreasing score (ties: the earlier detection first), then the
    first ``max_dets``; ``max_dets < 0`` keeps everything. Detections are in the results' order.
    """
    n = len(scores)
    if max_dets < 0:
        return np.ones(n, dtype=bool)
    order = np.lexsort((np.arange(n), -np.asarray(scores, np.float64), image_ids))
    ids = np.asarray(image_ids)[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if n else np.zeros(0, np.int64)
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    keep = np.zeros(n, dtype=bool)
    keep[order[rank < max_dets]] = True
    return keep


def select_detections(gt, image_ids, cat_ids, areas, selected):
    """``_prepare``'s filter: which of the ``selected`` detections the evaluation uses.

    Args:
        gt (GroundTruthArrays): the ground truth.
        image_ids, cat_ids, areas: (N,) the detections' image, category and area.
        selected: (N,) bool, what ``LVISResults`` keeps (the per-image cut).

    Returns:
        (keep, key): (N,) bool and (N,) pair keys (-1 where not kept).

    Raises:
        ValueError: a selected detection's image is not in the ground truth (the LVIS API's
            "Results do not correspond to current LVIS set" assertion).
    """
    rank = gt.image_rank(image_ids)
    unknown = selected & (rank < 0)
    if unknown.any():
        ids = sorted(set(np.asarray(image_ids)[unknown].tolist()))
        raise ValueError(
            f"Detections on {len(ids)} image id(s) that the ground truth does not have (e.g. "
            f"{ids[:5]}): the results do not correspond to this LVIS dataset"
        )
    index = gt.cat_index(cat_ids)
    key = np.where(index >= 0, rank * gt.num_cats + index, -1)
    areas = np.asarray(areas, dtype=np.float64)
    keep = selected & (index >= 0) & (areas > 0) & (areas < np.inf)
    pos = np.minimum(np.searchsorted(gt.verified, key), max(len(gt.verified) - 1, 0))
    keep &= (gt.verified[pos] == key) if len(gt.verified) else False
    return keep, np.where(keep, key, -1)


# pycocotools' area() builds its output with np.array((n,), dtype=np.uint8): with numpy >= 2 a list
# of more than 255 masks overflows, so masks go in chunks.
_AREA_CHUNK = 255


def mask_areas(rles):
    """(N,) float64 areas of RLE dicts (``mask_utils.area``, the value LVISResults stores)."""
    out = np.zeros(len(rles), dtype=np.float64)
    for i in range(0, len(rles), _AREA_CHUNK):
        out[i : i + _AREA_CHUNK] = mask_utils.area(rles[i : i + _AREA_CHUNK])
    return out


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
        key (N,): pair keys of the evaluated detections (see :func:`select_detections`).
        score (N,), order (N,): scores and the detections' order in the results (ties).
        area (N,): areas (box ``w * h`` or mask area, as ``LVISResults`` sets them).
        box (N, 4) xywh for "bbox"; rles (list of N RLE dicts) for "segm".
        max_dets (int): the per-image cut that was applied (informative; like ``LVISEval``,
            ``params.max_dets`` stays 300 and only names the AR keys).
    """

    def __init__(
        self, lvis_gt, iou_type, key, score, order, area, *, box=None, rles=None, max_dets=300
    ):
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
        max_dets), iou_type)`` would see them (areas from "bbox" when the first result has one,
        else from the mask, as ``LVISResults`` decides)."""
        arrays = detections_from_results(results, iou_type)
        gt = GroundTruthArrays.of(lvis_gt)
        selected = per_image_top(arrays["image_id"], arrays["score"], max_dets)
        keep, key = select_detections(
            gt, arrays["image_id"], arrays["category_id"], arrays["area"], selected
        )
        idx = np.flatnonzero(keep)
        rles = arrays.get("rles")
        return cls(
            lvis_gt,
            iou_type,
            key[idx],
            arrays["score"][idx],
            idx,
            arrays["area"][idx],
            box=None if arrays.get("box") is None else arrays["box"][idx],
            rles=None if rles is None else [rles[i] for i in idx.tolist()],
            max_dets=max_dets,
        )

    @classmethod
    def from_shards(cls, lvis_gt, paths, iou_type, max_dets=300, positions=None):
        """From the streaming evaluator's shard files, without building a result dict.

        The same detections as ``from_results`` on the list the shards hold: per image the
        top-``max_dets`` cut over all its detections (for "segm": of the images with masks), then
        ``_prepare``'s filter. Only the detections of categories verified in their image (a
        superset of what is evaluated) keep their box or mask in memory.

        Args:
            paths (list[str]): shard files (:mod:`.shards`) in rank order.
            positions (np.ndarray or None): sorted positions (in the results' order) of the only
                detections to consider, for Fixed AP; then no per-image cut (``max_dets`` -1).

        Returns:
            FastLVISEval, or None when a score is NaN (the API's sort is then order-dependent:
            the caller falls back to the LVIS API).
        """
        gt = GroundTruthArrays.of(lvis_gt)
        with_masks = iou_type == "segm"
        rec_image, rec_count, scores = [], [], []  # every record taking part in the cut
        c_index, c_image, c_cat, c_box, c_rles = [], [], [], [], []  # the candidates
        present = offset = 0
        for path in paths:
            for image_id, cats, scr, boxes, size, counts in iter_shard(path, with_masks):
                n = len(scr)
                start, offset = offset, offset + n
                if with_masks and counts is None:
                    continue  # an image without masks is not in the mask pass's results
                verified = gt.verified_cats(image_id)
                # An image the ground truth lacks: all candidates, so that the check raises.
                cand = np.ones(n, bool) if verified is None else np.isin(cats, verified)
                if positions is not None:
                    lo, hi = np.searchsorted(positions, [start, start + n])
                    chosen = np.zeros(n, bool)
                    chosen[positions[lo:hi] - start] = True
                    cand &= chosen
                idx = np.flatnonzero(cand)
                rec_image.append(image_id)
                rec_count.append(n)
                scores.append(np.asarray(scr, dtype=np.float64))
                c_index.append(present + idx)
                c_image.append(np.full(len(idx), image_id, dtype=np.int64))
                c_cat.append(np.asarray(cats)[idx])
                if with_masks:
                    c_rles.extend({"size": size, "counts": counts[k]} for k in idx.tolist())
                else:
                    c_box.append(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[idx])
                present += n
        empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0, np.float64)
        scores = np.concatenate(scores) if scores else empty_f
        if np.isnan(scores).any():
            return None
        selected = np.ones(len(scores), dtype=bool)
        if positions is None and max_dets >= 0 and rec_image:
            # Only images with more detections than the cap need the sort (a detector's
            # per-image top-k usually sees to that): LVIS val has 6M detections.
            rec_image = np.asarray(rec_image, dtype=np.int64)
            rec_count = np.asarray(rec_count, dtype=np.int64)
            _, inverse = np.unique(rec_image, return_inverse=True)
            over = np.bincount(inverse, weights=rec_count)[inverse] > max_dets
            if over.any():
                det_record = np.repeat(np.arange(len(rec_count)), rec_count)
                sub = np.flatnonzero(over[det_record])
                selected[sub] = per_image_top(rec_image[det_record[sub]], scores[sub], max_dets)
        c_index = np.concatenate(c_index) if c_index else empty_i
        c_image = np.concatenate(c_image) if c_image else empty_i
        c_cat = np.concatenate(c_cat) if c_cat else empty_i
        selected = selected[c_index]
        box = None
        if with_masks:
            area = np.zeros(len(c_index))
            chosen = np.flatnonzero(selected)
            if len(chosen):  # mask areas only where they can matter
                area[chosen] = mask_areas([c_rles[i] for i in chosen.tolist()])
        else:
            box = np.concatenate(c_box) if c_box else np.zeros((0, 4))
            area = box[:, 2] * box[:, 3]
        keep, key = select_detections(gt, c_image, c_cat, area, selected)
        idx = np.flatnonzero(keep)
        return cls(
            lvis_gt,
            iou_type,
            key[idx],
            scores[c_index[idx]],
            c_index[idx],
            area[idx],
            box=None if box is None else box[idx],
            rles=[c_rles[i] for i in idx.tolist()] if with_masks else None,
            max_dets=max_dets,
        )

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


def detections_from_results(results, iou_type):
    """Arrays of a list of LVIS result dicts, with the areas ``LVISResults`` would set.

    Returns:
        dict: ``image_id``, ``category_id`` (N,) int64, ``score`` (N,) float64, ``area`` (N,),
        and ``box`` (N, 4) for "bbox" or ``rles`` (list) for "segm".
    """
    n = len(results)
    if n == 0:
        return {
            "image_id": np.zeros(0, np.int64),
            "category_id": np.zeros(0, np.int64),
            "score": np.zeros(0),
            "area": np.zeros(0),
            "box": np.zeros((0, 4)) if iou_type == "bbox" else None,
            "rles": [] if iou_type == "segm" else None,
        }
    out = {
        "image_id": np.asarray([r["image_id"] for r in results], dtype=np.int64),
        "category_id": np.asarray([r["category_id"] for r in results], dtype=np.int64),
        "score": np.asarray([r["score"] for r in results], dtype=np.float64),
    }
    box_areas = "bbox" in results[0]
    if box_areas:
        box = np.asarray([r["bbox"] for r in results], dtype=np.float64).reshape(n, 4)
    if iou_type == "segm" or not box_areas:
        out["rles"] = [r["segmentation"] for r in results]
    if iou_type == "bbox":
        # Without "bbox" LVISResults derives the boxes from the masks.
        out["box"] = box if box_areas else mask_utils.toBbox(out["rles"]).reshape(n, 4)
    if box_areas:
        out["area"] = box[:, 2] * box[:, 3]
    else:
        out["area"] = mask_areas(out["rles"])
    return out
