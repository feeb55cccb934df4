"""Long-tail classification metrics: top-1 / top-5 overall and per shot split, macro F1, a
per-class table and plot against training frequency.

Shot splits (OLTR / Decoupling / DisAlign): a class is *many*-shot with more than
``many_threshold`` training images (100 on ImageNet-LT), *few*-shot with fewer than
``few_threshold`` (20), *medium* otherwise. A split's accuracy is the mean of its classes'
accuracies (the standard definition; on a balanced test set it equals the image-level accuracy);
``top1`` / ``top5`` are image-level accuracies over the whole test set. Macro F1 is the mean over
classes of ``2 TP / (2 TP + FP + FN)`` (0 for a class that is neither predicted nor present).
"""

import csv
import logging
import os
from collections import OrderedDict
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from .per_class import new_figure

__all__ = ["ClassificationEvaluator", "classification_metrics", "shot_split"]

logger = logging.getLogger(__name__)

PER_CLASS_CSV = "per_class_accuracy.csv"
PER_CLASS_PLOT = "per_class_accuracy.png"


def shot_split(train_counts: Sequence[int], many_threshold: int, few_threshold: int) -> np.ndarray:
    """(C,) array of "many" (count > many_threshold), "few" (count < few_threshold) or
    "medium"."""
    if few_threshold > many_threshold:
        raise ValueError(f"few_threshold {few_threshold} > many_threshold {many_threshold}")
    n = np.asarray(train_counts)
    return np.where(n > many_threshold, "many", np.where(n < few_threshold, "few", "medium"))


def classification_metrics(
    labels: np.ndarray,
    topk: np.ndarray,
    train_counts: Sequence[int],
    many_threshold: int,
    few_threshold: int,
) -> Dict[str, object]:
    """Metrics of predictions ``topk`` ((N, k) class indices, best first, k >= 1) against
    ``labels`` ((N,)), in percent.

    Returns a dict: ``top1``, ``top5`` (when k >= 5), ``many_top1`` / ``medium_top1`` /
    ``few_top1`` (NaN for an empty split), ``macro_f1`` and ``per_class`` ((C,) accuracy, NaN for a
    class absent from the test set), ``split`` ((C,) shot split).
    """
    labels = np.asarray(labels, dtype=np.int64)
    topk = np.asarray(topk, dtype=np.int64).reshape(len(labels), -1)
    num_classes = len(train_counts)
    pred = topk[:, 0]
    correct1 = pred == labels
    out: Dict[str, object] = OrderedDict()
    out["top1"] = 100.0 * correct1.mean() if len(labels) else float("nan")
    if topk.shape[1] >= 5:
        out["top5"] = 100.0 * (topk[:, :5] == labels[:, None]).any(1).mean()
    support = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels[correct1], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, 100.0 * hits / np.maximum(support, 1), np.nan)
    split = shot_split(train_counts, many_threshold, few_threshold)
    for name in ("many", "medium", "few"):
        vals = per_class[(split == name) & (support > 0)]
        out[f"{name}_top1"] = float(vals.mean()) if vals.size else float("nan")
    predicted = np.bincount(pred, minlength=num_classes)
    tp = hits.astype(np.float64)
    denom = predicted + support  # 2 TP + FP + FN = (TP + FP) + (TP + FN)
    f1 = np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0)
    out["macro_f1"] = 100.0 * float(f1.mean())
    out["per_class"] = per_class
    out["split"] = split
    return out


class ClassificationEvaluator(DatasetEvaluator):
    """Evaluates ``[{"logits": (C,)}]`` model outputs against the inputs' ``"label"``.

    Each process keeps only (label, top-k indices) per image; ``evaluate()`` gathers them on the
    main process (``comm.gather``, as detectron2's evaluators do), which computes the metrics and
    writes ``per_class_accuracy.csv`` / ``.png`` to ``output_dir``. Thresholds and the training
    counts default to ``dataset_name``'s metadata (``many_threshold``, ``few_threshold``,
    ``class_image_count``: those of its training split).
    """

    def __init__(
        self,
        dataset_name: str,
        *,
        output_dir: Optional[str] = None,
        many_threshold: Optional[int] = None,
        few_threshold: Optional[int] = None,
        topk: int = 5,
        distributed: bool = True,
    ):
        meta = MetadataCatalog.get(dataset_name)
        self.dataset_name = dataset_name
        self.train_counts = list(meta.class_image_count)
        self.many_threshold = (
            many_threshold if many_threshold is not None else meta.get("many_threshold", 100)
        )
        self.few_threshold = (
            few_threshold if few_threshold is not None else meta.get("few_threshold", 20)
        )
        self.topk = min(topk, len(self.train_counts))
        self.output_dir = output_dir
        self.distributed = distributed
        self.reset()

    def reset(self):
        self._labels, self._topk = [], []

    def process(self, inputs, outputs):
        logits = torch.stack([o["logits"] for o in outputs]).detach()
        self._topk.append(logits.topk(self.topk, dim=1).indices.cpu().numpy())
        self._labels.append(np.asarray([int(d["label"]) for d in inputs], dtype=np.int64))

    def evaluate(self):
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64)
        topk = np.concatenate(self._topk) if self._topk else np.zeros((0, self.topk), np.int64)
        if self.distributed and comm.get_world_size() > 1:
            gathered = comm.gather((labels, topk), dst=0)
            if not comm.is_main_process():
                return {}
            labels = np.concatenate([g[0] for g in gathered])
            topk = np.concatenate([g[1] for g in gathered])
        if len(labels) == 0:
            logger.warning("ClassificationEvaluator on %s got no predictions", self.dataset_name)
            return {}
        m = classification_metrics(
            labels, topk, self.train_counts, self.many_threshold, self.few_threshold
        )
        if self.output_dir:
            self._write_per_class(m["per_class"], m["split"])
        res = OrderedDict((k, float(v)) for k, v in m.items() if k not in ("per_class", "split"))
        return {"classification": res}

    def _write_per_class(self, per_class, split):
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, PER_CLASS_CSV)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["class", "train_images", "split", "top1"])
            for c, (n, s, a) in enumerate(zip(self.train_counts, split, per_class)):
                w.writerow([c, n, s, "" if np.isnan(a) else f"{a:.2f}"])
        fig = new_figure((6, 4))
        if fig is None:
            return
        ax = fig.subplots()
        colours = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
        n = np.asarray(self.train_counts)
        for s, col in colours.items():
            sel = (split == s) & ~np.isnan(per_class)
            ax.scatter(n[sel], per_class[sel], s=12, c=col, label=s)
        ax.set_xscale("log")
        ax.set_xlabel("training images of the class")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(self.dataset_name)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self.output_dir, PER_CLASS_PLOT), dpi=100)
