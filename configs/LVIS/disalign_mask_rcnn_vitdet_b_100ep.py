"""DisAlign stage two on ViTDet's LVIS v1.0 Mask R-CNN, ViT-B (sigmoid CE + federated loss).

The stage one is ViTDet's own config, projects/ViTDet/configs/LVIS/mask_rcnn_vitdet_b_100ep.py of
a detectron2 checkout ($DETECTRON2_ROOT), and by default its published checkpoint:

    DETECTRON2_ROOT=/path/to/detectron2 python tools/lazyconfig_train_net.py --num-gpus 8 \
        --config-file configs/LVIS/disalign_mask_rcnn_vitdet_b_100ep.py

Everything of the stage one is frozen (drop-path off); only beta, gamma and the confidence layers
of the box predictor and the mask head train, with GRW (rho 0.8) on the sigmoid/federated loss.
"""

from detectron2.config import LazyCall as L

from disalign_det.evaluation import StreamingLVISEvaluator
from disalign_det.lazy import load_project_config, use_disalign

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

# The official stage two is 9k iterations x 16 images with the LR step at 8k and 1k warmup
# iterations; at ViTDet's 64 images per iteration: 2250 iterations, step at 2000, warmup 250.
# The optimizer is ViTDet's (AdamW, LR 2e-4 at batch 64, layer-wise decay: factor 1 outside the
# backbone, i.e. for every calibration parameter).
train.max_iter = 2250
lr_multiplier.scheduler.values = [1.0, 0.1]
lr_multiplier.scheduler.milestones = [2000]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 250 / train.max_iter
train.checkpointer.period = 250
train.eval_period = train.max_iter

dataloader.evaluator = L(StreamingLVISEvaluator)(
    dataset_name="${..test.dataset.names}",
    tasks=("bbox", "segm"),
    max_dets_per_image=300,
    output_dir="${train.output_dir}/inference",
)
