"""Long-tail semantic-segmentation metrics: detectron2's ``SemSegEvaluator`` plus mIoU and mean
accuracy of the head, body and tail classes, a per-class IoU table and its plot.

ADE20K-150's classes are sorted by pixel frequency, so the official DisAlign code splits them by
index: head 0-19, body 20-74, tail 75-149. Any other dataset is split in the same proportions
after sorting its classes by training pixels (or as ``TEST.SEM_SEG_GROUPS`` says).
"""

import logging
import os
from typing import List, Optional, Sequence

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from detectron2.utils import comm

from .per_class import new_figure, write_per_class_table

__all__ = [
    "ADE20K_GROUPS",
    "GROUP_NAMES",
    "LongTailSemSegEvaluator",
    "build_sem_seg_evaluator",
    "frequency_groups",
    "group_metrics",
    "iou_and_accuracy",
]

logger = logging.getLogger(__name__)

GROUP_NAMES = ("head", "body", "tail")
#: ADE20K-150's split of the official code (classes are indexed by decreasing pixel frequency).
ADE20K_GROUPS = (list(range(0, 20)), list(range(20, 75)), list(range(75, 150)))
PER_CLASS_IOU_BASENAME = "per_class_iou"


def frequency_groups(counts: Sequence[float]) -> List[List[int]]:
    """Head / body / tail class indices of a dataset with (C,) training pixel ``counts``: the
    classes by decreasing count, cut in ADE20K's proportions (20, 55 and 75 of 150)."""
    counts = np.asarray(counts, dtype=np.float64)
    k = len(counts)
    order = np.argsort(-counts, kind="stable")
    n_head = int(round(k * len(ADE20K_GROUPS[0]) / 150))
    n_body = int(round(k * len(ADE20K_GROUPS[1]) / 150))
    cuts = [order[:n_head], order[n_head : n_head + n_body], order[n_head + n_body :]]
    return [sorted(int(i) for i in c) for c in cuts]


def iou_and_accuracy(conf_matrix: np.ndarray):
    """Per-class IoU and accuracy of a ``SemSegEvaluator`` confusion matrix.

    Args:
        conf_matrix: (C + 1, C + 1) counts, ``[prediction, ground truth]``, the last row/column
            the ignore label.

    Returns:
        (iou, acc), each (C,) in [0, 1], NaN where undefined: accuracy = tp / gt pixels where the
        class has ground truth, IoU = tp / (gt + pred - tp) where the class has ground truth
        (detectron2's rule: a class absent from the ground truth is left out of the means).
    """
    m = conf_matrix[:-1, :-1].astype(np.float64)
    tp = np.diag(m)
    gt = m.sum(axis=0)
    pred = m.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.where(gt > 0, tp / gt, np.nan)
        union = gt + pred - tp
        iou = np.where((gt > 0) & (union > 0), tp / union, np.nan)
    return iou, acc


def _nanmean(x):
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def group_metrics(iou, acc, groups: Sequence[Sequence[int]]) -> dict:
    """{"mIoU-head": ..., "mACC-head": ..., ...} in percent: means over each group's classes
    with a defined value."""
    out = {}
    for name, idx in zip(GROUP_NAMES, groups):
        idx = list(idx)
        out[f"mIoU-{name}"] = 100 * _nanmean(np.asarray(iou)[idx]) if idx else float("nan")
        out[f"mACC-{name}"] = 100 * _nanmean(np.asarray(acc)[idx]) if idx else float("nan")
    return out


class LongTailSemSegEvaluator(SemSegEvaluator):
    """``SemSegEvaluator`` whose results also hold ``mIoU-head/body/tail`` and
    ``mACC-head/body/tail``; with an ``output_dir`` it writes ``per_class_iou.json`` / ``.csv``
    (class, group, training pixels, IoU, accuracy) and ``per_class_iou.png``."""

    def __init__(
        self,
        dataset_name,
        *,
        groups: Sequence[Sequence[int]],
        train_pixel_counts: Optional[Sequence[float]] = None,
        **kwargs,
    ):
        super().__init__(dataset_name, **kwargs)
        groups = [list(map(int, g)) for g in groups]
        flat = sorted(i for g in groups for i in g)
        if len(groups) != 3 or flat != list(range(self._num_classes)):
            raise ValueError(
                f"TEST.SEM_SEG_GROUPS must be three lists (head, body, tail) holding each of the "
                f"{self._num_classes} classes of {dataset_name!r} exactly once"
            )
        self._groups = groups
        self._train_pixel_counts = train_pixel_counts

    def evaluate(self):
        results = super().evaluate()
        if not comm.is_main_process() or results is None:
            return results
        iou, acc = iou_and_accuracy(self._conf_matrix)
        results["sem_seg"].update(group_metrics(iou, acc, self._groups))
        if self._output_dir:
            rows = self._per_class_rows(iou, acc)
            write_per_class_table(self._output_dir, rows, PER_CLASS_IOU_BASENAME)
            _plot(rows, os.path.join(self._output_dir, PER_CLASS_IOU_BASENAME + ".png"))
        logger.info(
            "Long-tail mIoU: %s",
            ", ".join(f"{k} {v:.2f}" for k, v in results["sem_seg"].items() if "-" in k[:6]),
        )
        return results

    def _per_class_rows(self, iou, acc):
        group_of = {i: name for name, g in zip(GROUP_NAMES, self._groups) for i in g}
        counts = self._train_pixel_counts
        return [
            {
                "class": k,
                "name": self._class_names[k],
                "group": group_of[k],
                "train_pixels": None if counts is None else float(counts[k]),
                "IoU": None if np.isnan(iou[k]) else 100 * float(iou[k]),
                "ACC": None if np.isnan(acc[k]) else 100 * float(acc[k]),
            }
            for k in range(self._num_classes)
        ]


def _plot(rows, path):
    """IoU of each class against its training pixels (log x), coloured by group."""
    fig = new_figure((7, 4))
    if fig is None:
        return
    ax = fig.subplots()
    use_counts = all(r["train_pixels"] for r in rows)
    for name, colour in zip(GROUP_NAMES, ("#1f77b4", "#ff7f0e", "#d62728")):
        pts = [r for r in rows if r["group"] == name and r["IoU"] is not None]
        xs = [r["train_pixels"] if use_counts else r["class"] for r in pts]
        ax.scatter(xs, [r["IoU"] for r in pts], s=12, c=colour, label=name)
    if use_counts:
        ax.set_xscale("log")
    ax.set_xlabel("training pixels" if use_counts else "class index")
    ax.set_ylabel("IoU (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _is_ade20k_150(dataset_name, num_classes):
    return dataset_name.startswith("ade20k_sem_seg") and num_classes == 150


def build_sem_seg_evaluator(cfg, dataset_name, output_folder=None):
    """The trainer's evaluator for a dataset with ``evaluator_type == "sem_seg"``: groups from
    ``TEST.SEM_SEG_GROUPS``, ADE20K-150's index split, or the training pixel frequencies."""
    from ..data.sem_seg_counts import pixel_counts_from_cfg

    num_classes = len(MetadataCatalog.get(dataset_name).stuff_classes)
    counts = None
    if cfg.TEST.SEM_SEG_GROUPS:
        groups = [list(g) for g in cfg.TEST.SEM_SEG_GROUPS]
    elif _is_ade20k_150(dataset_name, num_classes):
        groups = ADE20K_GROUPS
    else:
        counts = pixel_counts_from_cfg(cfg)
        groups = frequency_groups(counts)
    if counts is None and cfg.DATASETS.TRAIN:
        try:  # for the table only; cached after the first count
            counts = pixel_counts_from_cfg(cfg)
        except Exception as e:  # e.g. training data not on this machine (--eval-only)
            logger.info("No training pixel counts for the per-class table: %s", e)
    return LongTailSemSegEvaluator(
        dataset_name,
        groups=groups,
        train_pixel_counts=counts,
        distributed=True,
        output_dir=output_folder,
    )
