"""Places-LT stage one: ResNet-152 initialised from torchvision's ImageNet weights (what the
literature starts from: OLTR, Decoupling, DisAlign), fine-tuned 30 epochs at batch 256, LR 0.01
cosine (the official repo ships no Places-LT config; see docs/classification.md). The weights
cannot be downloaded here: convert yours once, then point train.init_checkpoint at the result:

    python tools/convert_torchvision_resnet.py resnet152-394f9c45.pth \
        output/pretrained/resnet152_torchvision_d2.pth
    python tools/lazyconfig_train_net.py --num-gpus 8 --config-file configs/Places-LT/resnet152.py

The converted file has no classifier (ImageNet's 1000 classes, Places-LT has 365): only
``head.cls_score`` starts from scratch.
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

PLACES_LT_TRAIN_IMAGES = 62500

model.backbone.depth = 152
model.num_classes = 365
optimizer.lr = 0.01

dataloader.train.dataset.names = "places_lt_train"
dataloader.test.dataset.names = "places_lt_test"

set_run(
    train,
    max_iter=epochs_to_iters(PLACES_LT_TRAIN_IMAGES, 30, 256),
    checkpoint_period=epochs_to_iters(PLACES_LT_TRAIN_IMAGES, 5, 256),
    output_dir="output/places_lt/resnet152",
    init_checkpoint="output/pretrained/resnet152_torchvision_d2.pth",
)
