"""What the LVIS API evaluates, as arrays: the inputs of the "fast" backend.

:class:`GroundTruthArrays` is what ``LVISEval._prepare`` derives from the ground truth;
:func:`inputs_from_results` and :func:`inputs_from_shards` are ``LVISResults`` + ``_prepare`` for
detections (the per-image top-k cut, unknown categories, ``0 < area < inf``, the federated filter)
from a list of result dicts or straight from the streaming evaluator's shard files. The matching
and accumulation are in :mod:`.fast_lvis_eval`.
"""

import numpy as np
import pycocotools.mask as mask_utils

from .shards import iter_shard

__all__ = [
    "GroundTruthArrays",
    "detections_from_results",
    "inputs_from_results",
    "index_in",
    "inputs_from_shards",
    "mask_areas",
    "per_image_top",
    "select_detections",
]

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
        return index_in(self.img_ids, image_ids)

    def cat_index(self, cat_ids):
        """(N,) index of each category id among ``cat_ids``; -1 for an unknown one."""
        return index_in(self.cat_ids, cat_ids)

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


def index_in(sorted_values, values):
    """(N,) position of each of ``values`` in the sorted unique int64 array ``sorted_values``;
    -1 where it is absent."""
    values = np.asarray(values, dtype=np.int64)
    if len(sorted_values) == 0:
        return np.full(values.shape, -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return np.where(sorted_values[pos] == values, pos, -1)


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
    keep &= index_in(gt.verified, key) >= 0
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


def inputs_from_results(gt, results, iou_type, max_dets=300):
    """``FastLVISEval``'s inputs from LVIS result dicts: what ``LVISEval(lvis_gt,
    LVISResults(lvis_gt, results, max_dets), iou_type)`` evaluates (areas from "bbox" when the
    first result has one, else from the mask, as ``LVISResults`` decides).

    Returns:
        dict: ``key``, ``score``, ``order`` (position in ``results``), ``area`` (N,) and ``box``
        (N, 4) or ``rles`` (list), for the N evaluated detections.
    """
    arrays = detections_from_results(results, iou_type)
    selected = per_image_top(arrays["image_id"], arrays["score"], max_dets)
    keep, key = select_detections(
        gt, arrays["image_id"], arrays["category_id"], arrays["area"], selected
    )
    idx = np.flatnonzero(keep)
    rles = arrays.get("rles")
    return {
        "key": key[idx],
        "score": arrays["score"][idx],
        "order": idx,
        "area": arrays["area"][idx],
        "box": None if arrays.get("box") is None else arrays["box"][idx],
        "rles": None if rles is None else [rles[i] for i in idx.tolist()],
    }


def inputs_from_shards(gt, paths, iou_type, max_dets=300, positions=None):
    """``FastLVISEval``'s inputs from the streaming evaluator's shards, without result dicts.

    The same detections as :func:`inputs_from_results` on the list the shards hold: per image the
    top-``max_dets`` cut over all its detections (for "segm": of the images with masks), then
    ``_prepare``'s filter. Only the detections of categories verified in their image (a
    superset of what is evaluated) keep their box or mask in memory.

    Args:
        paths (list[str]): shard files (:mod:`.shards`) in rank order.
        positions (np.ndarray or None): sorted positions (in the results' order) of the only
            detections to consider, for Fixed AP; then no per-image cut (``max_dets`` -1).

    Returns:
        dict as :func:`inputs_from_results` (``order``: position in the shards), or None when a
        score is NaN.
    """
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
    return {
        "key": key[idx],
        "score": scores[c_index[idx]],
        "order": c_index[idx],
        "area": area[idx],
        "box": None if box is None else box[idx],
        "rles": [c_rles[i] for i in idx.tolist()] if with_masks else None,
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
