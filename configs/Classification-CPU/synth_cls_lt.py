"""Stage one on the generated long-tail set of fine-grained families (30 classes: frequent
parents, rare variants that add a small detail; 100 -> 2 training images per class, balanced test
split; disalign_det.data.classification_cpu), the narrow ResNet-18 of digits_lt.py."""

from ..common.classification import set_run
from .digits_lt import (  # noqa: F401  (the config's nodes)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.num_classes = 30
dataloader.train.dataset.names = "synth_cls_lt_train"
dataloader.test.dataset.names = "synth_cls_lt_test"
set_run(train, max_iter=1000, output_dir="output/classification_cpu/synth_cls_lt")  # ~40 epochs
