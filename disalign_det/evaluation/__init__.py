"""Evaluation for disalign-det: memory-bounded LVIS evaluation with the stock metrics, Fixed AP,
per-class tables and an opt-in faster metric backend."""

import logging

from detectron2.data import MetadataCatalog

from .classification_evaluation import ClassificationEvaluator
from .fixed_ap import apply_fixed_ap_config
from .lvis_evaluation import (
    DEFAULT_MAX_DETS_PER_IMAGE,
    LVIS_METRICS,
    LeanLVISEval,
    StreamingLVISEvaluator,
    evaluate_results_on_lvis,
)
from .per_class import PER_CLASS_BASENAME

__all__ = [
    "ClassificationEvaluator",
    "DEFAULT_MAX_DETS_PER_IMAGE",
    "LVIS_METRICS",
    "LeanLVISEval",
    "PER_CLASS_BASENAME",
    "StreamingLVISEvaluator",
    "apply_fixed_ap_config",
    "build_lvis_evaluator",
    "evaluate_results_on_lvis",
]

logger = logging.getLogger(__name__)


def _train_counts(cfg):
    """(image_count, instance_count) of the first training dataset, or None if unknown."""
    for name in cfg.DATASETS.TRAIN[:1]:
        try:
            meta = MetadataCatalog.get(name)
            return list(meta.image_count), list(meta.instance_count)
        except Exception as e:  # not registered / no counts / json not on this machine
            logger.info("No training counts for the per-class table from %r: %s", name, e)
    return None


def build_lvis_evaluator(cfg, dataset_name, output_folder=None):
    """The evaluator the trainer uses for an LVIS-format dataset.

    Standard AP is computed over at most ``cfg.TEST.DETECTIONS_PER_IMAGE`` detections per image,
    the number the model is configured to output (LVIS configs set 300, the official limit), so
    that the evaluation never silently drops detections the model produced nor pretends it had
    more; with ``TEST.LVIS_EVAL.FIXED_AP`` (which sets that key to -1, no cap) standard AP uses
    the official 300 and Fixed AP (top ``TEST.LVIS_EVAL.FIXED_AP_DETS_PER_CLASS`` per category)
    is reported beside it as tasks ``bbox_fixed`` / ``segm_fixed``.
    Tasks come from the config rather than from the predictions, so that a model that predicts
    nothing still reports (NaN) mask metrics when it has a mask head.

    Every evaluation writes the per-class table (``per_class_ap.json`` / ``.csv``) into
    ``cfg.OUTPUT_DIR`` (next to ``metrics_final.json``), named ``per_class_ap_<dataset>`` when
    several test datasets share that folder.

    Args:
        cfg (CfgNode): the full config.
        dataset_name (str): a registered dataset with ``json_file`` metadata.
        output_folder (str or None): where ``lvis_instances_results.json`` (and, during
            evaluation, the shard files) go.

    Returns:
        StreamingLVISEvaluator
    """
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    max_dets = int(cfg.TEST.DETECTIONS_PER_IMAGE)
    node = cfg.TEST.get("LVIS_EVAL", None)
    fixed = bool(node is not None and node.FIXED_AP)
    fixed_k = int(node.FIXED_AP_DETS_PER_CLASS) if fixed else 0
    backend = node.BACKEND if node is not None else "lvis"
    background_json = (
        bool(node.get("BACKGROUND_RESULTS_JSON", False)) if node is not None else False
    )
    if fixed:
        if 0 <= max_dets <= DEFAULT_MAX_DETS_PER_IMAGE:
            raise ValueError(
                f"TEST.LVIS_EVAL.FIXED_AP=True but TEST.DETECTIONS_PER_IMAGE={max_dets} caps the "
                "model per image: call apply_fixed_ap_config(cfg) before building the model "
                "(tools/train_net.py does), or set TEST.DETECTIONS_PER_IMAGE -1"
            )
        max_dets = DEFAULT_MAX_DETS_PER_IMAGE  # standard AP beside Fixed AP: the official 300
    several = len(cfg.DATASETS.TEST) > 1
    basename = f"{PER_CLASS_BASENAME}_{dataset_name}" if several else PER_CLASS_BASENAME
    logger.info(
        "LVIS evaluator for %s: tasks %s, at most %d detections per image%s, backend %s",
        dataset_name,
        tasks,
        max_dets,
        f", Fixed AP (top {fixed_k} per class)" if fixed else "",
        backend,
    )
    return StreamingLVISEvaluator(
        dataset_name,
        tasks=tasks,
        distributed=True,
        output_dir=output_folder,
        max_dets_per_image=max_dets,
        fixed_ap_dets_per_class=fixed_k,
        backend=backend,
        per_class_dir=cfg.OUTPUT_DIR or output_folder,
        per_class_basename=basename,
        train_counts=_train_counts(cfg),
        background_results_json=background_json,
    )
