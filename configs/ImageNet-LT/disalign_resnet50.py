"""ImageNet-LT DisAlign stage two on the ResNet-50 stage one (the official stage-two recipe)."""

from .disalign_resnext50 import (  # noqa: F401  (the config's nodes)
    dataloader,
    disalign,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.backbone.num_groups = 1
model.backbone.width_per_group = 64
train.init_checkpoint = "output/imagenet_lt/resnet50/model_final.pth"
train.output_dir = "output/imagenet_lt/disalign_resnet50"
