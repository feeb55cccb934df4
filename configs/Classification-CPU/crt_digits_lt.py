"""cRT baseline (Kang et al. 2020, classifier re-training) on the digits stage one: only the linear
classifier trains, with class-balanced sampling and plain cross-entropy, the DisAlign stage-two
schedule. (The classifier continues from its stage-one weights.)"""

from ..common.classification import crt_stage_two, set_run
from .digits_lt import (  # noqa: F401  (the config's nodes)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

disalign = crt_stage_two(dataloader, optimizer)
set_run(
    train,
    max_iter=150,
    output_dir="output/classification_cpu/crt_digits_lt",
    init_checkpoint="output/classification_cpu/digits_lt/model_final.pth",
)
