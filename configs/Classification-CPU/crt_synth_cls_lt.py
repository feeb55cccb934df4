"""cRT baseline on the synth_cls_lt stage one (as crt_digits_lt.py)."""

from detectron2.config import LazyCall as L

from disalign_det.data.classification import ClassBalancedTrainingSampler, dataset_labels

from .synth_cls_lt import (  # noqa: F401  (the config's nodes)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

disalign = {"freeze": "all_but_classifier"}
dataloader.train.sampler = L(ClassBalancedTrainingSampler)(
    labels=L(dataset_labels)(names="${...dataset.names}")
)
optimizer.weight_decay = 5e-4
train.init_checkpoint = "output/classification_cpu/synth_cls_lt/model_final.pth"
train.max_iter = 250
train.eval_period = train.max_iter
train.checkpointer.period = train.max_iter
train.output_dir = "output/classification_cpu/crt_synth_cls_lt"
