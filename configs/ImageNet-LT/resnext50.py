"""ImageNet-LT stage one, the official DisAlign recipe (Megvii-BaseDetection/DisAlign,
classification/imagenetlt/resnext50/resx50.scratch.imagenet_lt.224size.90e): ResNeXt-50 32x4d from
scratch (zero-initialised residual branches), 224 px RandomResizedCrop + flip + ColorJitter 0.4,
batch 256, SGD LR 0.1 momentum 0.9 weight decay 5e-4 (norms too), cosine to 0, 90 epochs.

    python tools/lazyconfig_train_net.py --num-gpus 8 --config-file configs/ImageNet-LT/resnext50.py
"""

from ..common.classification import (  # noqa: F401  (the config's nodes)
    dataloader,
    epochs_to_iters,
    lr_multiplier,
    model,
    optimizer,
    set_run,
    train,
)

IMAGENET_LT_TRAIN_IMAGES = 115846

model.backbone.num_groups = 32
model.backbone.width_per_group = 4
model.backbone.zero_init_residual = True
model.num_classes = 1000

dataloader.train.dataset.names = "imagenet_lt_train"
dataloader.test.dataset.names = "imagenet_lt_test"

set_run(
    train,
    max_iter=epochs_to_iters(IMAGENET_LT_TRAIN_IMAGES, 90, 256),
    checkpoint_period=epochs_to_iters(IMAGENET_LT_TRAIN_IMAGES, 5, 256),
    output_dir="output/imagenet_lt/resnext50",
)
