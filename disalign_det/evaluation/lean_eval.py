"""``LeanLVISEval``: the LVIS API's evaluation without its memory-heavy per-image state (a leaf,
imported by both LVIS evaluation backends)."""

import numpy as np
from lvis import LVISEval

from ..compat import numpy_aliases

__all__ = ["LeanLVISEval"]


class LeanLVISEval(LVISEval):
    """``lvis.LVISEval`` that skips (image, category) pairs with neither ground truth nor detection.

    The stock ``evaluate()`` calls ``compute_iou`` and ``evaluate_img`` for every pair of
    ``params.img_ids x params.cat_ids``; each call indexes the ``_gts``/``_dts`` defaultdicts (which
    inserts an empty list) and stores an empty ``ious`` entry. For an empty pair ``evaluate_img``
    returns ``None`` right after that lookup, so visiting only the non-empty pairs and storing
    ``None`` for the rest gives the same ``eval_imgs`` list, in the same order, hence the same
    ``accumulate()`` and ``summarize()`` output, without ~3 dict entries per pair.
    """

    def evaluate(self):
        """Per-image evaluation, as ``LVISEval.evaluate`` but over non-empty pairs only."""
        if not self.params.use_cats:
            # Pairs are per image only here; nothing to skip, and keep the stock semantics.
            return super().evaluate()

        self.logger.info("Running per image evaluation.")
        self.logger.info("Evaluate annotation type *{}*".format(self.params.iou_type))
        # Same normalisation as the stock method (numpy scalars hash and compare like ints).
        self.params.img_ids = list(np.unique(self.params.img_ids))
        cat_ids = self.params.cat_ids

        self._prepare()
        active = set(self._gts.keys())
        active.update(self._dts.keys())

        self.ious = {key: self.compute_iou(*key) for key in active}
        # Same loop order as the stock method: accumulate() indexes eval_imgs by position, and
        # evaluate_img() mutates the ground-truth dicts ("_ignore") call by call.
        self.eval_imgs = [
            self.evaluate_img(img_id, cat_id, area_rng) if (img_id, cat_id) in active else None
            for cat_id in cat_ids
            for area_rng in self.params.area_rng
            for img_id in self.params.img_ids
        ]

    def accumulate(self):
        """``LVISEval.accumulate``, with the numpy aliases lvis 0.5.3 uses there (``np.float``,
        removed in numpy 1.24) set for this call only (:func:`disalign_det.compat.numpy_aliases`;
        goes when lvis stops using them)."""
        with numpy_aliases():
            super().accumulate()
