"""Stage one on the long-tailed handwritten digits (scikit-learn's real 8x8 digits at 32x32,
150 -> 3 training images per class, balanced test split; disalign_det.data.classification_cpu):
a narrow ResNet-18 (widths 16-128) on 1 CPU core, about a minute.

    python tools/lazyconfig_train_net.py --config-file configs/Classification-CPU/digits_lt.py
"""

from ..common.classification import (  # noqa: F401  (the config's nodes)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    set_run,
    train,
)

model.backbone.depth = 18
model.backbone.stem_out_channels = 16
model.backbone.res2_out_channels = 16
model.num_classes = 10
model.pixel_mean = [128.0, 128.0, 128.0]
model.pixel_std = [64.0, 64.0, 64.0]

dataloader.train.dataset.names = "digits_lt_train"
# Digits must not be flipped (2 / 5) and are grey: crops only.
dataloader.train.mapper.update(image_size=32, min_scale=0.6, flip=False, color_jitter=0.0)
dataloader.train.total_batch_size = 32
dataloader.train.num_workers = 0
dataloader.test.dataset.names = "digits_lt_test"
dataloader.test.mapper.update(image_size=32, resize_size=32)
dataloader.test.batch_size = 128
dataloader.test.num_workers = 0

optimizer.lr = 0.1
train.device = "cpu"
set_run(train, max_iter=600, output_dir="output/classification_cpu/digits_lt")  # ~45 epochs
train.log_period = 100
