"""DisAlign stage two on the synth_cls_lt stage one (as disalign_digits_lt.py: 1/4 of stage one)."""

from ..common.classification import disalign_stage_two, set_run
from .synth_cls_lt import (  # noqa: F401  (the config's nodes)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

disalign = disalign_stage_two(model, optimizer, rho=1.2, lr=0.1, weight_decay=5e-4)
set_run(
    train,
    max_iter=250,
    output_dir="output/classification_cpu/disalign_synth_cls_lt",
    init_checkpoint="output/classification_cpu/synth_cls_lt/model_final.pth",
)
