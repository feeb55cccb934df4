"""Fixed AP (Dave et al., "Evaluating Large-Vocabulary Object Detectors: The Devil is in the
Details", 2021), computed from the streaming evaluator's shards with bounded memory.

Standard LVIS AP keeps the 300 highest-scoring detections of each *image*, so re-scaling scores
across classes (what a calibration such as DisAlign does) can move AP without changing any
per-class ranking. Fixed AP removes the per-image cap and keeps instead the ``K`` (10,000 on LVIS)
highest-scoring detections of each *category* over the whole dataset; everything else is the LVIS
API's evaluation (federated ground truth, IoU thresholds, r/c/f groups) with no per-image limit.

The protocol, as its public reference implementation evaluates a results list:

1. group all detections by category; within a category sort by decreasing score (a stable sort:
   ties keep the results' order) and keep the first ``K``;
2. ``LVISResults(gt, kept, max_dets=-1)`` and ``LVISEval`` with ``params.max_dets = -1``.

Here step 1 runs while streaming the shards (:class:`PerClassTopK`): only ``(category, score,
position)`` of each detection is read, in bounded chunks, and after each chunk every category is
cut back to its best ``K`` (ties broken by position, i.e. the results' order). Memory is at most
``categories x K`` entries of 24 bytes (1203 x 10,000: 0.3 GB) plus one chunk, whatever the number
of images. The evaluation pass then builds result dicts only for kept detections whose category is
verified in their image (the others are dropped by ``LVISEval._prepare`` anyway, as in
:func:`~disalign_det.evaluation.lvis_evaluation.load_lvis_results`).

Inference must not cap detections per image either (``TEST.DETECTIONS_PER_IMAGE = -1``), see
:func:`apply_fixed_ap_config`. Without that cap a sigmoid classifier at a low score threshold
returns thousands of detections per image, and each goes through the mask head and is pasted.
:class:`FixedAPPruner` (``TEST.LVIS_EVAL.FIXED_AP_PRUNE``) drops, before the mask head, those that
no reported number can use; the metrics are unchanged (see its docstring).
"""

import contextlib
import logging

import numpy as np
import torch

__all__ = [
    "FIXED_AP_DETS_PER_CLASS",
    "FIXED_AP_KEY",
    "FixedAPPruner",
    "PerClassTopK",
    "apply_fixed_ap_config",
    "fixed_task_name",
    "load_fixed_ap_results",
    "pruning_before_masks",
    "select_top_per_class",
]

logger = logging.getLogger(__name__)

#: K of Fixed AP on LVIS.
FIXED_AP_DETS_PER_CLASS = 10000
#: The config switch.
FIXED_AP_KEY = "TEST.LVIS_EVAL.FIXED_AP"
# Per-image caps that are detectron2's / LVIS's standard values: the switch replaces them by -1.
_STANDARD_CAPS = (100, 300)


def fixed_task_name(task):
    """Key of the Fixed AP metrics in the results dict: ``"bbox_fixed"`` / ``"segm_fixed"``."""
    return f"{task}_fixed"


def apply_fixed_ap_config(cfg):
    """Apply what ``TEST.LVIS_EVAL.FIXED_AP`` needs to ``cfg`` (unfrozen) and check conflicts.

    With the switch on:

    * ``TEST.DETECTIONS_PER_IMAGE`` (the model's per-image top-k, read by the box predictor) is set
      to -1, no cap, when it holds a standard cap (100: detectron2's default; 300: LVIS's). Any
      other value below 300 is a conflict (a cap the user chose that Fixed AP forbids) and raises;
      -1 and values above 300 are kept (a large cap as a memory guard: logged).
    * ``TEST.LVIS_EVAL.FIXED_AP_DETS_PER_CLASS`` (K) must be positive.

    Standard AP is still reported, at the official 300 detections per image, from the same
    detections. Returns ``cfg``.
    """
    node = cfg.TEST.LVIS_EVAL
    if not node.FIXED_AP:
        return cfg
    k = int(node.FIXED_AP_DETS_PER_CLASS)
    if k <= 0:
        raise ValueError(
            f"TEST.LVIS_EVAL.FIXED_AP_DETS_PER_CLASS must be positive with {FIXED_AP_KEY}=True, "
            f"got {k}"
        )
    cap = int(cfg.TEST.DETECTIONS_PER_IMAGE)
    if cap in _STANDARD_CAPS:
        logger.info(
            "%s: TEST.DETECTIONS_PER_IMAGE %d -> -1 (no per-image cap; top %d per class over "
            "the dataset)",
            FIXED_AP_KEY,
            cap,
            k,
        )
        cfg.TEST.DETECTIONS_PER_IMAGE = -1
    elif 0 <= cap < 300:
        raise ValueError(
            f"{FIXED_AP_KEY}=True evaluates without a per-image cap, but TEST.DETECTIONS_PER_IMAGE="
            f"{cap} caps the model at {cap} detections per image. Set TEST.DETECTIONS_PER_IMAGE "
            "to -1 (or leave it at its default), or turn the switch off."
        )
    elif cap > 300:
        logger.warning(
            "%s with TEST.DETECTIONS_PER_IMAGE=%d: the model still caps detections per image; "
            "Fixed AP assumes no cap (-1)",
            FIXED_AP_KEY,
            cap,
        )
    return cfg


class PerClassTopK:
    """The ``k`` highest-scoring detections of each category, kept while streaming.

    Detections arrive in the results' order; each gets its position (0, 1, ...) in that order.
    The kept set is exactly what "stable sort by decreasing score, keep the first ``k``" gives per
    category over all detections: ties at the cut keep the earliest positions.

    Memory: at most ``categories x k`` kept entries plus ``chunk`` buffered ones, 24 bytes each.
    """

    #: Detections buffered before a merge (tests lower it to exercise merging).
    DEFAULT_CHUNK = 1 << 20

    def __init__(self, k, chunk=None):
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        self.k = int(k)
        self.chunk = max(int(self.DEFAULT_CHUNK if chunk is None else chunk), 1)
        self.num_seen = 0
        # Kept entries, then buffered chunks not yet merged into them.
        self._cats = np.zeros(0, np.int64)
        self._scores = np.zeros(0, np.float64)
        self._pos = np.zeros(0, np.int64)
        self._pending = []
        self._pending_len = 0

    def add(self, cats, scores):
        """Append one image's detections: ``cats`` (N,) int and ``scores`` (N,) float."""
        n = len(scores)
        if n == 0:
            return
        pos = np.arange(self.num_seen, self.num_seen + n, dtype=np.int64)
        self.num_seen += n
        self._pending.append((np.asarray(cats, np.int64), np.asarray(scores, np.float64), pos))
        self._pending_len += n
        if self._pending_len >= self.chunk:
            self._merge()

    def _merge(self):
        if not self._pending:
            return
        cats, scores, pos = zip(*self._pending)
        cats = np.concatenate((self._cats,) + cats)
        scores = np.concatenate((self._scores,) + scores)
        pos = np.concatenate((self._pos,) + pos)
        self._pending, self._pending_len = [], 0
        # Group by category; within a group decreasing score, then increasing position.
        order = np.lexsort((pos, -scores, cats))
        cats, scores, pos = cats[order], scores[order], pos[order]
        starts = np.flatnonzero(np.r_[True, cats[1:] != cats[:-1]])
        sizes = np.diff(np.r_[starts, len(cats)])
        rank = np.arange(len(cats)) - np.repeat(starts, sizes)
        keep = rank < self.k
        self._cats, self._scores, self._pos = cats[keep], scores[keep], pos[keep]

    def positions(self):
        """(M,) sorted positions of the kept detections."""
        self._merge()
        return np.sort(self._pos)

    def counts(self):
        """{category: number kept} (a category with fewer than ``k`` detections keeps all)."""
        self._merge()
        cats, counts = np.unique(self._cats, return_counts=True)
        return dict(zip(cats.tolist(), counts.tolist()))


def select_top_per_class(paths, k, iter_shard):
    """Positions (in the results' order) of the top-``k`` detections per category in the shards.

    Args:
        paths (list[str]): shard files, in rank order (the results' order).
        k (int): detections kept per category.
        iter_shard: the shard reader (``lvis_evaluation.iter_shard``), passed in to avoid a cycle.

    Returns:
        (np.ndarray, PerClassTopK): the sorted positions and the selector (for its counts).
    """
    top = PerClassTopK(k)
    for path in paths:
        for _, cats, scores, *_ in iter_shard(path, False):
            top.add(cats, scores)
    positions = top.positions()
    short = sum(1 for n in top.counts().values() if n < k)
    if short:
        logger.info(
            "Fixed AP: %d categories have fewer than %d detections over the dataset (Fixed AP "
            "is lower than it could be; lower ROI_HEADS.SCORE_THRESH_TEST for more)",
            short,
            k,
        )
    return positions, top


def load_fixed_ap_results(paths, task, positions, lvis_gt, iter_shard, append_results, verified):
    """Result dicts of the kept detections, for one task, in the results' order.

    Detections whose category is neither annotated in their image nor in its negative list are
    not built (``LVISEval`` ignores them; see the module docstring); if that leaves nothing while
    something was kept, one of them is handed over so that the LVIS API still evaluates (AP 0
    where there is ground truth) as it would on the full list.

    Args:
        paths: shard files in rank order; positions: from :func:`select_top_per_class`.
        task: "bbox" or "segm"; lvis_gt: ``lvis.LVIS`` (unused but for symmetry of callers).
        iter_shard, append_results: the shard reader and result builder of ``lvis_evaluation``.
        verified (dict): image id -> set of category ids ``LVISEval`` evaluates in that image.
    """
    with_masks = task == "segm"
    results, spare = [], None
    offset = 0
    for path in paths:
        for image_id, cats, scores, boxes, size, counts in iter_shard(path, with_masks):
            n = len(scores)
            lo, hi = np.searchsorted(positions, [offset, offset + n])
            local = (positions[lo:hi] - offset).tolist()
            offset += n
            if not local or (with_masks and counts is None):
                continue
            cat_list = cats.tolist()
            record = (cat_list, scores.tolist(), boxes.tolist(), size, counts)
            ok = verified.get(image_id)
            if ok is None:
                kept = local  # not a ground-truth image: LVISResults rejects it itself
            else:
                kept = [j for j in local if cat_list[j] in ok]
                if spare is None and len(kept) < len(local):
                    spare = (image_id, record, next(j for j in local if cat_list[j] not in ok))
            append_results(results, image_id, record, kept, with_masks)
    if not results and spare is not None:
        image_id, record, j = spare
        append_results(results, image_id, record, [j], with_masks)
    return results


class FixedAPPruner:
    """Drops, image by image, the detections no number of a Fixed AP evaluation can use.

    The evaluation reports standard AP over each image's ``dets_per_image`` best detections and
    Fixed AP over each category's ``dets_per_class`` best over the dataset. A detection is kept if
    its score is at least

    * the ``dets_per_image``-th best score of its image (ties kept), or
    * the ``dets_per_class``-th best score of its category among the detections seen so far, this
      image's included (all kept while fewer have been seen).

    Why nothing that counts is dropped: the second threshold only rises as images arrive and is a
    K-th best over a subset of the dataset, so it never exceeds the final K-th best; a detection
    strictly below it is strictly below the final cut of its category. Kept detections keep their
    order, so the ties of the stable per-category sort (:class:`PerClassTopK`) and of the per-image
    cut resolve as without pruning. Several processes each prune their own images, with
    thresholds below the global ones: still exact. Any per-image cut at most ``dets_per_image``
    taken later from the saved detections is exact too.
    """

    def __init__(self, dets_per_class, dets_per_image):
        if dets_per_class <= 0 or dets_per_image <= 0:
            raise ValueError(
                f"dets_per_class ({dets_per_class}) and dets_per_image ({dets_per_image}) must be "
                "positive"
            )
        self.k = int(dets_per_class)
        self.p = int(dets_per_image)
        self._top = {}  # category -> (<= k,) best scores so far, decreasing
        self.num_seen = 0
        self.num_kept = 0

    def keep(self, classes, scores):
        """Boolean mask (N,) over one image's detections: ``classes`` (N,) int, ``scores`` (N,)."""
        n = scores.numel()
        if n > self.p:
            keep = scores >= scores.topk(self.p).values[-1]
        else:
            keep = torch.ones(n, dtype=torch.bool, device=scores.device)
        for c in classes.unique().tolist():
            sel = classes == c
            mine = scores[sel]
            best = self._top.get(c)
            merged = mine if best is None else torch.cat([best, mine])
            best = merged.topk(min(self.k, merged.numel())).values
            self._top[c] = best
            if best.numel() == self.k:
                keep[sel] |= mine >= best[-1]
            else:
                keep[sel] = True
        self.num_seen += n
        self.num_kept += int(keep.sum())
        return keep

    def __call__(self, instances):
        """``instances`` (detectron2 ``Instances`` with ``scores``, ``pred_classes``) pruned."""
        if len(instances) == 0:
            return instances
        return instances[self.keep(instances.pred_classes, instances.scores)]


@contextlib.contextmanager
def pruning_before_masks(model, pruner):
    """Within the block, ``model``'s ROI heads prune their box detections with ``pruner`` before
    the mask (and keypoint) heads see them.

    The ROI heads' ``forward_with_given_boxes`` (where detectron2's ``StandardROIHeads`` and its
    subclasses run the mask head at inference) is wrapped on the instance, and the class's method
    is back on exit. A model without it is left alone (logged).
    """
    model = getattr(model, "module", model)  # DistributedDataParallel
    heads = getattr(model, "roi_heads", None)
    inner = getattr(heads, "forward_with_given_boxes", None)
    if inner is None:
        logger.info("%s: no roi_heads.forward_with_given_boxes, nothing pruned", FIXED_AP_KEY)
        yield pruner
        return
    own = "forward_with_given_boxes" in vars(heads)

    def forward_with_given_boxes(features, instances):
        return inner(features, [pruner(x) for x in instances])

    heads.forward_with_given_boxes = forward_with_given_boxes
    try:
        yield pruner
    finally:
        if own:
            heads.forward_with_given_boxes = inner
        else:
            del heads.forward_with_given_boxes
        logger.info(
            "%s: %d of %d detections kept before the mask head (the others are below both their "
            "image's top %d and their category's running top %d)",
            FIXED_AP_KEY,
            pruner.num_kept,
            pruner.num_seen,
            pruner.p,
            pruner.k,
        )
