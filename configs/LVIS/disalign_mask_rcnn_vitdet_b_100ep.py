"""DisAlign stage two on ViTDet's LVIS v1.0 Mask R-CNN, ViT-B (sigmoid CE + federated loss).

The stage one is ViTDet's own config, projects/ViTDet/configs/LVIS/mask_rcnn_vitdet_b_100ep.py of
a detectron2 checkout ($DETECTRON2_ROOT), and by default its published checkpoint:

    DETECTRON2_ROOT=/path/to/detectron2 python tools/lazyconfig_train_net.py --num-gpus 8 \
        --config-file configs/LVIS/disalign_mask_rcnn_vitdet_b_100ep.py

Everything of the stage one is frozen (drop-path off); only beta, gamma and the confidence layers
of the box predictor and the mask head train, with GRW (rho 0.8) on the sigmoid/federated loss.
"""

from disalign_det.lazy import load_project_config, set_stage_two_schedule, use_disalign

_stage_one = load_project_config("LVIS/mask_rcnn_vitdet_b_100ep.py")
dataloader = _stage_one.dataloader
model = _stage_one.model
optimizer = _stage_one.optimizer
lr_multiplier = _stage_one.lr_multiplier
train = _stage_one.train

disalign = use_disalign(model, dataloader, optimizer, rho=0.8)

# ViTDet's published LVIS Mask R-CNN ViT-B (box AP 40.2, mask AP 38.2 in ViTDet's README).
train.init_checkpoint = (
    "https://dl.fbaipublicfiles.com/detectron2/ViTDet/LVIS/mask_rcnn_vitdet_b/329225748/"
    "model_final_5251c5.pkl"
)
train.output_dir = "output/lvis/disalign_mask_rcnn_vitdet_b"

# The official stage two (9k iterations x 16 images, LR step at 8k, 1k warm-up) at ViTDet's 64
# images per iteration: 2250 iterations, step at 2000, warm-up 250. The optimizer is ViTDet's
# (AdamW, LR 2e-4 at batch 64, layer-wise decay: factor 1 outside the backbone, i.e. for every
# calibration parameter).
set_stage_two_schedule(train, lr_multiplier, dataloader)
