"""ImageNet-LT DisAlign stage two, the official recipe (.../resx50...90e.disalign.10e): from the
stage one of resnext50.py, only the calibration trains (beta, gamma, s(x)), 10 epochs, batch 256,
LR 0.1 cosine, weight decay 5e-4, GRW exponent 1.2.

    python tools/lazyconfig_train_net.py --num-gpus 8 \
        --config-file configs/ImageNet-LT/disalign_resnext50.py \
        train.init_checkpoint=output/imagenet_lt/resnext50/model_final.pth
"""

from ..common.classification import disalign_stage_two, epochs_to_iters, set_run
from .resnext50 import (  # noqa: F401  (the config's nodes)
    IMAGENET_LT_TRAIN_IMAGES,
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

disalign = disalign_stage_two(model, optimizer, rho=1.2, lr=0.1, weight_decay=5e-4)

set_run(
    train,
    max_iter=epochs_to_iters(IMAGENET_LT_TRAIN_IMAGES, 10, 256),
    checkpoint_period=epochs_to_iters(IMAGENET_LT_TRAIN_IMAGES, 2, 256),
    output_dir="output/imagenet_lt/disalign_resnext50",
    init_checkpoint="output/imagenet_lt/resnext50/model_final.pth",
)
