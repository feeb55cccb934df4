"""Base of the long-tail classification LazyConfigs: detectron2's ResNet + DisAlign's classifier
head, the torchvision augmentations of the official recipe, SGD with a cosine schedule, the
long-tail evaluator. A dataset config imports this file and changes a few fields; a DisAlign stage
two calls :func:`disalign_stage_two` on them (it is importable from this file)."""

import torch
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_train_loader
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import CosineParamScheduler
from omegaconf import OmegaConf

from disalign_det.data.classification import (
    ClassBalancedTrainingSampler,
    ClassificationMapper,
    build_classification_test_loader,
    dataset_labels,
    get_classification_dicts,
)
from disalign_det.evaluation.classification_evaluation import ClassificationEvaluator
from disalign_det.modeling.classification import (
    ImageClassifier,
    build_classification_resnet,
    classification_class_counts,
)

model = L(ImageClassifier)(
    backbone=L(build_classification_resnet)(depth=50),
    num_classes=1000,
    # torchvision's ImageNet normalisation in the 0-255 scale, RGB input.
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
)

dataloader = OmegaConf.create()
# detectron2's train loader: tools/lazyconfig_train_net.py builds it with the library's resumable
# loader (exact resumes, with or without workers); no aspect-ratio grouping for square crops.
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_classification_dicts)(names="imagenet_lt_train"),
    mapper=L(ClassificationMapper)(is_train=True, image_size=224, color_jitter=0.4),
    total_batch_size=256,
    aspect_ratio_grouping=False,
    num_workers=8,
)
dataloader.test = L(build_classification_test_loader)(
    dataset=L(get_classification_dicts)(names="imagenet_lt_test"),
    mapper=L(ClassificationMapper)(is_train=False, image_size=224, resize_size=256),
    batch_size=64,
    num_workers=8,
)
dataloader.evaluator = L(ClassificationEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${train.output_dir}/inference",
)

optimizer = L(torch.optim.SGD)(
    # The official recipe decays norm parameters too (WEIGHT_DECAY_NORM = WEIGHT_DECAY).
    params=L(get_default_optimizer_params)(weight_decay_norm=None),
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
)

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_length=0.0,
    warmup_factor=1.0,
)

train = dict(
    output_dir="output/classification",
    init_checkpoint="",
    max_iter=1000,
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=5),
    eval_period=0,
    log_period=20,
    device="cuda",
    seed=-1,
)


def epochs_to_iters(num_images: int, epochs: float, batch: int) -> int:
    """Iterations of ``epochs`` passes over ``num_images`` at ``batch`` images per iteration."""
    return int(round(num_images * epochs / batch))


def set_run(train, *, max_iter, output_dir, checkpoint_period=None, init_checkpoint=None):
    """``max_iter`` iterations evaluated once at the end, a checkpoint every ``checkpoint_period``
    iterations (default: only at the end), outputs in ``output_dir``."""
    train.max_iter = max_iter
    train.eval_period = max_iter
    train.checkpointer.period = checkpoint_period or max_iter
    train.output_dir = output_dir
    if init_checkpoint is not None:
        train.init_checkpoint = init_checkpoint


def crt_stage_two(dataloader, optimizer, *, weight_decay=5e-4):
    """cRT (Kang et al. 2020) in place: only the linear classifier trains, with class-balanced
    sampling and plain cross-entropy. Returns the ``disalign`` node (freeze mode)."""
    dataloader.train.sampler = L(ClassBalancedTrainingSampler)(
        labels=L(dataset_labels)(names="${...dataset.names}")
    )
    optimizer.weight_decay = weight_decay
    return {"freeze": "all_but_classifier"}


def disalign_stage_two(model, optimizer, *, rho, lr=None, weight_decay=None):
    """Turn a stage-one config into DisAlign's stage two in place: calibration on, GRW loss with
    exponent ``rho`` (class counts from ``dataloader.train``'s dataset metadata), everything but
    the calibration frozen (the trunk then runs without autograd). Returns the ``disalign`` node
    that tools/lazyconfig_train_net.py reads (it loads ``train.init_checkpoint`` strictly: only
    calibration keys may be missing)."""
    model.calibration = True
    model.loss = "grw"
    model.rho = rho
    model.class_counts = L(classification_class_counts)(
        dataset_names="${dataloader.train.dataset.names}"
    )
    if lr is not None:
        optimizer.lr = lr
    if weight_decay is not None:
        optimizer.weight_decay = weight_decay
    return {"freeze": "all_but_calibration"}
