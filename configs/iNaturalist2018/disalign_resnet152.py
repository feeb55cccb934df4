"""iNaturalist 2018 DisAlign stage two on the ResNet-152 stage one."""

from .disalign_resnet50 import (  # noqa: F401  (the config's nodes)
    dataloader,
    disalign,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.backbone.depth = 152
train.init_checkpoint = "output/inat2018/resnet152/model_final.pth"
train.output_dir = "output/inat2018/disalign_resnet152"
