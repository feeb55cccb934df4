"""Evaluation for disalign-det: memory-bounded LVIS evaluation with the stock metrics."""

import logging

from .lvis_evaluation import (
    DEFAULT_MAX_DETS_PER_IMAGE,
    LVIS_METRICS,
    LeanLVISEval,
    StreamingLVISEvaluator,
    evaluate_results_on_lvis,
)

__all__ = [
    "DEFAULT_MAX_DETS_PER_IMAGE",
    "LVIS_METRICS",
    "LeanLVISEval",
    "StreamingLVISEvaluator",
    "build_lvis_evaluator",
    "evaluate_results_on_lvis",
]

logger = logging.getLogger(__name__)


def build_lvis_evaluator(cfg, dataset_name, output_folder=None):
    """The evaluator the trainer uses for an LVIS-format dataset.

    AP is computed over at most ``cfg.TEST.DETECTIONS_PER_IMAGE`` detections per image, the number
    the model is configured to output (LVIS configs set 300, the official limit), so that the
    evaluation never silently drops detections the model produced nor pretends it had more.
    Tasks come from the config rather than from the predictions, so that a model that predicts
    nothing still reports (NaN) mask metrics when it has a mask head.

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
    logger.info(
        "LVIS evaluator for %s: tasks %s, at most %d detections per image",
        dataset_name,
        tasks,
        max_dets,
    )
    return StreamingLVISEvaluator(
        dataset_name,
        tasks=tasks,
        distributed=True,
        output_dir=output_folder,
        max_dets_per_image=max_dets,
    )
