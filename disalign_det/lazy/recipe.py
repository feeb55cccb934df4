"""The official DisAlign stage-two schedule, scaled to a LazyConfig's batch size.

The paper's LVIS v1.0 stage two is 9k iterations of 16 images, LR step at 8k, 1k warm-up
iterations (v0.5: 4.5k and 4k). A LazyConfig (e.g. ViTDet's, 64 images per iteration) keeps its
own optimizer and LR and trains the same number of images: every length is scaled by 16 / batch.
"""

from detectron2.config import LazyCall as L

__all__ = ["OFFICIAL_STAGE_TWO", "set_stage_two_schedule"]

#: (iterations, LR step, warm-up iterations) at 16 images per iteration, per LVIS version (the
#: warm-up is detectron2's default SOLVER.WARMUP_ITERS, as in the YAML stage-two configs).
OFFICIAL_STAGE_TWO = {"v1": (9000, 8000, 1000), "v0.5": (4500, 4000, 1000)}
_OFFICIAL_BATCH = 16


def set_stage_two_schedule(train, lr_multiplier, dataloader, *, lvis_version="v1"):
    """Set ``train.max_iter``, the LR step and warm-up of ``lr_multiplier`` (a
    ``WarmupParamScheduler`` of a ``MultiStepParamScheduler``, as in ViTDet's configs), one
    checkpoint per warm-up length, one evaluation at the end, and the streaming LVIS evaluator
    (box + mask, 300 detections per image) on ``dataloader.test``. Lengths are the official
    schedule's scaled to ``dataloader.train.total_batch_size``."""
    from disalign_det.evaluation import StreamingLVISEvaluator

    if lvis_version not in OFFICIAL_STAGE_TWO:
        raise ValueError(
            f"lvis_version must be one of {sorted(OFFICIAL_STAGE_TWO)}, got {lvis_version!r}"
        )
    batch = int(dataloader.train.total_batch_size)
    iters, step, warmup = (
        round(n * _OFFICIAL_BATCH / batch) for n in OFFICIAL_STAGE_TWO[lvis_version]
    )
    train.max_iter = iters
    lr_multiplier.scheduler["values"] = [1.0, 0.1]  # item access: DictConfig.values is a method
    lr_multiplier.scheduler.milestones = [step]
    lr_multiplier.scheduler.num_updates = iters
    lr_multiplier.warmup_length = warmup / iters
    train.checkpointer.period = warmup
    train.eval_period = iters
    dataloader.evaluator = L(StreamingLVISEvaluator)(
        dataset_name="${..test.dataset.names}",
        tasks=("bbox", "segm"),
        max_dets_per_image=300,
        output_dir="${train.output_dir}/inference",
    )
