"""Places-LT DisAlign stage two: calibration only on the resnet152.py stage one, 10 epochs, LR 0.1
cosine, weight decay 5e-4, GRW exponent 1.2 (the official ImageNet-LT stage-two recipe; the
official repo has no Places-LT config)."""

from ..common.classification import disalign_stage_two, epochs_to_iters, set_run
from .resnet152 import (  # noqa: F401  (the config's nodes)
    PLACES_LT_TRAIN_IMAGES,
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

disalign = disalign_stage_two(model, optimizer, rho=1.2, lr=0.1, weight_decay=5e-4)

set_run(
    train,
    max_iter=epochs_to_iters(PLACES_LT_TRAIN_IMAGES, 10, 256),
    checkpoint_period=epochs_to_iters(PLACES_LT_TRAIN_IMAGES, 2, 256),
    output_dir="output/places_lt/disalign_resnet152",
    init_checkpoint="output/places_lt/resnet152/model_final.pth",
)
