"""iNaturalist 2018 stage one with ResNet-152 (as resnet50.py otherwise)."""

from .resnet50 import (  # noqa: F401  (the config's nodes)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.backbone.depth = 152
train.output_dir = "output/inat2018/resnet152"
