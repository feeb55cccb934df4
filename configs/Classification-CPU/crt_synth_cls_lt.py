"""cRT baseline on the synth_cls_lt stage one (as crt_digits_lt.py)."""

from ..common.classification import crt_stage_two, set_run
from .synth_cls_lt import (  # noqa: F401  (the config's nodes)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

disalign = crt_stage_two(dataloader, optimizer)
set_run(
    train,
    max_iter=250,
    output_dir="output/classification_cpu/crt_synth_cls_lt",
    init_checkpoint="output/classification_cpu/synth_cls_lt/model_final.pth",
)
