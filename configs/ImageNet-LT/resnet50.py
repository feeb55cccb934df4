"""ImageNet-LT stage one with ResNet-50 (the official ResNeXt-50 recipe of resnext50.py, plain
ResNet-50 trunk)."""

from .resnext50 import (  # noqa: F401  (the config's nodes)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.backbone.num_groups = 1
model.backbone.width_per_group = 64
train.output_dir = "output/imagenet_lt/resnet50"
