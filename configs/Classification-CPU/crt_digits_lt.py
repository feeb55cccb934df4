"""cRT baseline (Kang et al. 2020, classifier re-training) on the digits stage one: only the linear
classifier trains, with class-balanced sampling and plain cross-entropy, the DisAlign stage-two
schedule. (The classifier continues from its stage-one weights.)"""

from detectron2.config import LazyCall as L

from disalign_det.data.classification import ClassBalancedTrainingSampler, dataset_labels

from .digits_lt import (  # noqa: F401  (the config's nodes)
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
train.init_checkpoint = "output/classification_cpu/digits_lt/model_final.pth"
train.max_iter = 150
train.eval_period = train.max_iter
train.checkpointer.period = train.max_iter
train.output_dir = "output/classification_cpu/crt_digits_lt"
