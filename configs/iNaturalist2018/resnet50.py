"""iNaturalist 2018 stage one, ResNet-50 from scratch (the paper's setting; the official repo
ships no iNaturalist config: the optimizer and augmentations are those of the official ImageNet-LT
recipe, 90 epochs at batch 256, see docs/classification.md). Evaluated on the val split (the
literature's test set)."""

from ..common.classification import (  # noqa: F401  (the config's nodes)
    dataloader,
    epochs_to_iters,
    lr_multiplier,
    model,
    optimizer,
    set_run,
    train,
)

INAT2018_TRAIN_IMAGES = 437513

model.backbone.depth = 50
model.backbone.zero_init_residual = True
model.num_classes = 8142
optimizer.weight_decay = 1e-4

dataloader.train.dataset.names = "inat2018_train"
dataloader.test.dataset.names = "inat2018_val"

set_run(
    train,
    max_iter=epochs_to_iters(INAT2018_TRAIN_IMAGES, 90, 256),
    checkpoint_period=epochs_to_iters(INAT2018_TRAIN_IMAGES, 5, 256),
    output_dir="output/inat2018/resnet50",
)
