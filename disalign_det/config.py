"""Config keys of disalign-det (``add_disalign_config``).

Every key names the symbol of the DisAlign paper (Zhang et al., CVPR 2021) it controls. The defaults
are neutral: adding these keys to any detectron2 config changes nothing until the config also
selects ``DisAlignROIHeads`` / ``DisAlignMaskRCNNConvUpsampleHead`` or sets
``MODEL.DISALIGN.FREEZE``.
"""

from detectron2.config import CfgNode as CN

from .config_sem_seg import add_sem_seg_disalign_config
from .modeling.classification import add_classification_config
from .modeling.stage_one_losses import add_stage_one_loss_config

__all__ = ["add_disalign_config", "get_inference_cfg"]


def add_disalign_config(cfg):
    """Add the ``MODEL.DISALIGN`` node and this project's few other keys to ``cfg`` (in place)."""
    _C = cfg

    _C.MODEL.DISALIGN = CN()
    # Adaptive calibration of the box classifier: z'_j = s(x)(beta_j z_j + gamma_j) + (1 - s(x)) z_j
    # with beta = `logit_scale`, gamma = `logit_bias`, s(x) = sigmoid(`confidence_layer`(x)).
    _C.MODEL.DISALIGN.BOX_CALIBRATION = True
    # The same calibration on the per-class mask logits m_k(p) (the mask head must be
    # `DisAlignMaskRCNNConvUpsampleHead`).
    _C.MODEL.DISALIGN.MASK_CALIBRATION = True
    # Std of the normal init of the confidence layer's weight (its bias starts at 0), so that
    # s(x) = sigmoid(~0) and, with beta = 1 and gamma = 0, z' = z exactly at the start of stage two.
    _C.MODEL.DISALIGN.CONFIDENCE_INIT_STD = 0.01
    # Box classification loss: "ce" (plain softmax cross-entropy) or "grw" (generalized
    # re-weighting: softmax cross-entropy weighted by w_j = (1 / r_j) ** rho, see RHO).
    _C.MODEL.DISALIGN.CLS_LOSS = "grw"
    # Mask loss: "bce" (stock Mask R-CNN loss) or "grw" (per-RoI BCE weighted by w of the RoI's
    # ground-truth class, weighted mean).
    _C.MODEL.DISALIGN.MASK_LOSS = "grw"
    # rho, the exponent of the generalized re-weighting (paper: 0.8 on LVIS); 0 gives plain CE.
    _C.MODEL.DISALIGN.RHO = 0.8
    # n_j, the per-class training frequency behind r_j = n_j / sum_k n_k: "instance_count" (number
    # of training instances) or "image_count" (number of training images containing the class).
    # Read from the training json's categories or counted from its annotations.
    _C.MODEL.DISALIGN.FREQUENCY_SOURCE = "instance_count"
    # What trains in this run: "none" (stage one, everything trains), "all_but_calibration"
    # (DisAlign stage two: only beta, gamma and the confidence layers train; every other parameter
    # is frozen and every BatchNorm stays in eval mode) or "all_but_classifier" (calibration plus
    # the box classifier `cls_score`, the classifier re-training ablation).
    _C.MODEL.DISALIGN.FREEZE = "none"

    # Cosine classifier for `cls_score` (normalised features and weights): z_j = tau cos (no bias,
    # unless NORMED_LINEAR).
    _C.MODEL.ROI_BOX_HEAD.COSINE_CLASSIFIER = False
    # tau, the temperature of the cosine classifier (initial value; learned unless NORMED_LINEAR).
    _C.MODEL.ROI_BOX_HEAD.COSINE_SCALE = 20.0
    # With COSINE_CLASSIFIER: Seesaw's normalised linear classifier (mmdetection's NormedLinear:
    # tau = COSINE_SCALE fixed, plus a bias b_j) instead of the cosine one (learned tau, no bias).
    _C.MODEL.ROI_BOX_HEAD.NORMED_LINEAR = False

    # Training-free test-time alternatives to DisAlign (applied to the box classifier's softmax):
    # "none", "norcal" (foreground probabilities divided by n_j ** gamma, renormalised) or
    # "tau_norm" (classifier weight rows divided by ||w_j|| ** tau) or "fracal" (FRACAL: logits
    # adjusted by the image frequencies, probabilities by the fractal dimensions of the classes'
    # box centres; MODEL.DISALIGN.FRACAL_*, disalign_det/modeling/fracal.py).
    _C.MODEL.DISALIGN.POSTHOC = "none"
    # gamma of "norcal" / tau of "tau_norm".
    _C.MODEL.DISALIGN.POSTHOC_POWER = 1.0

    # Extra LVIS-format datasets, registered by name without writing Python: a list of
    # (name, json_file, image_root) triples. Metadata (classes, r/c/f frequency, image_count,
    # instance_count) is read from the json. Example on the command line:
    #   DATASETS.LVIS_FORMAT "(('my_train', 'a/train.json', 'a/images/'),)"
    _C.DATASETS.LVIS_FORMAT = ()
    # Annotations of those jsons with invalid values (bbox not finite / w or h <= 0 / off the image,
    # non-finite polygon, area <= 0) fail registration naming them; True drops them instead, with a
    # logged count (docs/errors.md).
    _C.DATASETS.DROP_INVALID_ANNOTATIONS = False

    # LVIS evaluation options (disalign_det.evaluation; docs/eval_backends.md).
    _C.TEST.LVIS_EVAL = CN()
    # Also report Fixed AP (Dave et al. 2021) as "bbox_fixed"/"segm_fixed": top-K detections per
    # class over the dataset, no per-image cap. Sets TEST.DETECTIONS_PER_IMAGE to -1 (raises if it
    # holds a smaller explicit cap); standard AP stays at 300 per image.
    _C.TEST.LVIS_EVAL.FIXED_AP = False
    _C.TEST.LVIS_EVAL.FIXED_AP_DETS_PER_CLASS = 10000  # K
    # With FIXED_AP: drop before the mask head the detections below both their image's 300th
    # score and their class's running K-th (FixedAPPruner). Exact: no reported number changes;
    # lvis_instances_results.json then holds only the detections that can count.
    _C.TEST.LVIS_EVAL.FIXED_AP_PRUNE = True
    # Metric backend: "lvis" (the LVIS API), "fast" (ours on arrays, bit-identical to the LVIS
    # API) or "faster_coco_eval" (opt-in C++, not bit-identical).
    _C.TEST.LVIS_EVAL.BACKEND = "lvis"
    # Write lvis_instances_results.json in a child process while the metrics are computed (same
    # bytes; it is float formatting, ~30 s on LVIS val). Local OUTPUT_DIR only.
    _C.TEST.LVIS_EVAL.BACKGROUND_RESULTS_JSON = True
    if "PRECISION" not in _C.SOLVER.AMP:  # detectron2 (v0.6 and main) has only ENABLED
        # Autocast dtype of SOLVER.AMP.ENABLED: "auto" (float16 on CUDA, bfloat16 on CPU),
        # "float16" (CUDA, with a grad scaler) or "bfloat16" (disalign_det.engine.loop).
        _C.SOLVER.AMP.PRECISION = "auto"
    add_stage_one_loss_config(_C)  # STAGE_ONE_LOSS, EQLV2, SEESAW, ECM, FRACAL_* keys
    add_sem_seg_disalign_config(_C)  # semantic segmentation (docs/semantic_segmentation.md)
    add_classification_config(_C)  # MODEL.CLASSIFIER, YAML ImageClassifier (docs/classification.md)
    return cfg


def get_inference_cfg(config_file, opts=()):
    """detectron2's default config with the DisAlign keys, ``config_file`` and ``opts`` (KEY VALUE
    ...) merged, on CPU when it asks for CUDA and there is none: what the inference tools
    (``tools/export_model.py``, ``tools/visualize.py``) run. Returned unfrozen."""
    import os

    import torch
    from detectron2.config import get_cfg

    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file {config_file!r} does not exist")
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    return cfg
