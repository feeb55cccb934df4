"""iNaturalist 2018 DisAlign stage two: the official ImageNet-LT stage-two recipe (calibration
only, 10 epochs, LR 0.1 cosine, weight decay 5e-4, GRW exponent 1.2) on the ResNet-50 stage one."""

from ..common.classification import disalign_stage_two, epochs_to_iters, set_run
from .resnet50 import (  # noqa: F401  (the config's nodes)
    INAT2018_TRAIN_IMAGES,
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

disalign = disalign_stage_two(model, optimizer, rho=1.2, lr=0.1, weight_decay=5e-4)

set_run(
    train,
    max_iter=epochs_to_iters(INAT2018_TRAIN_IMAGES, 10, 256),
    checkpoint_period=epochs_to_iters(INAT2018_TRAIN_IMAGES, 2, 256),
    output_dir="output/inat2018/disalign_resnet50",
    init_checkpoint="output/inat2018/resnet50/model_final.pth",
)
