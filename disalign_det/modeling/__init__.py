"""DisAlign modeling components; importing this module registers them in detectron2's registries
(``ROI_HEADS_REGISTRY``: DisAlignROIHeads, DisAlignCascadeROIHeads; ``ROI_MASK_HEAD_REGISTRY``:
DisAlignMaskRCNNConvUpsampleHead; ``PROPOSAL_GENERATOR_REGISTRY``: DisAlignRPN)."""

from . import losses  # noqa: F401
from .box_predictor import DisAlignFastRCNNOutputLayers
from .calibration import CosineLinear, NormedLinear, calibrate_logits
from .class_weights import install_class_weights, set_class_frequencies
from .classification import DisAlignClassifierHead, ImageClassifier
from .freeze import CALIBRATION_PARAMETER_NAMES, apply_freeze, is_calibration_parameter
from .losses import (
    grw_class_weights,
    weighted_cross_entropy,
    weighted_mask_bce,
    weighted_sigmoid_cross_entropy,
)
from .mask_head import DisAlignMaskRCNNConvUpsampleHead
from .roi_heads import DisAlignCascadeROIHeads, DisAlignROIHeads
from .rpn import DisAlignRPN
from .sem_seg import DisAlignDeepLabV3PlusHead, DisAlignSemSegFPNHead  # noqa: F401  (registers)

__all__ = [
    "CALIBRATION_PARAMETER_NAMES",
    "CosineLinear",
    "DisAlignCascadeROIHeads",
    "DisAlignClassifierHead",
    "DisAlignFastRCNNOutputLayers",
    "DisAlignMaskRCNNConvUpsampleHead",
    "DisAlignROIHeads",
    "DisAlignRPN",
    "ImageClassifier",
    "NormedLinear",
    "apply_freeze",
    "calibrate_logits",
    "grw_class_weights",
    "install_class_weights",
    "is_calibration_parameter",
    "set_class_frequencies",
    "weighted_cross_entropy",
    "weighted_mask_bce",
    "weighted_sigmoid_cross_entropy",
]
