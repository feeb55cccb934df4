"""DisAlign stage two on the digits stage one: calibration only, GRW exponent 1.2, LR 0.1 cosine,
weight decay 5e-4 (the official ImageNet-LT stage-two recipe), 150 iterations (1/4 of stage one).

    python tools/lazyconfig_train_net.py \
        --config-file configs/Classification-CPU/disalign_digits_lt.py \
        train.init_checkpoint=output/classification_cpu/digits_lt/model_final.pth
"""

from ..common.classification import disalign_stage_two, set_run
from .digits_lt import (  # noqa: F401  (the config's nodes)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

disalign = disalign_stage_two(model, optimizer, rho=1.2, lr=0.1, weight_decay=5e-4)
set_run(
    train,
    max_iter=150,
    output_dir="output/classification_cpu/disalign_digits_lt",
    init_checkpoint="output/classification_cpu/digits_lt/model_final.pth",
)
