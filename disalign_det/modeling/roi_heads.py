"""ROI heads that swap in the DisAlign box predictor (standard and cascade)."""

import logging

from detectron2.modeling.roi_heads import (
    ROI_HEADS_REGISTRY,
    CascadeROIHeads,
    StandardROIHeads,
)

from .box_predictor import DisAlignFastRCNNOutputLayers

__all__ = ["DisAlignROIHeads", "DisAlignCascadeROIHeads"]

logger = logging.getLogger(__name__)


class _SkipFrozenMaskBranch:
    """In training, skip the mask branch entirely (no pooling, no loss) when nothing behind the
    mask loss trains (mask head parameters or its input features), e.g. in a box-only stage two."""

    def _forward_mask(self, features, instances):
        if self.training and self.mask_on and not self._mask_branch_trains(features):
            return {}
        return super()._forward_mask(features, instances)

    def _mask_branch_trains(self, features):
        if any(p.requires_grad for p in self.mask_head.parameters()):
            return True
        return any(features[f].requires_grad for f in self.mask_in_features)


@ROI_HEADS_REGISTRY.register()
class DisAlignROIHeads(_SkipFrozenMaskBranch, StandardROIHeads):
    """``StandardROIHeads`` with :class:`DisAlignFastRCNNOutputLayers` as the box predictor.

    In training, the mask branch is skipped entirely (no pooling, no loss) when nothing behind the
    mask loss trains, e.g. in a box-only DisAlign stage two.
    """

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = DisAlignFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret


@ROI_HEADS_REGISTRY.register()
class DisAlignCascadeROIHeads(_SkipFrozenMaskBranch, CascadeROIHeads):
    """``CascadeROIHeads`` whose every stage's predictor is a :class:`DisAlignFastRCNNOutputLayers`
    (each stage has its own calibration parameters; inference averages the stages' calibrated
    probabilities, as the stock cascade does)."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictors"] = [
            DisAlignFastRCNNOutputLayers(
                cfg, head.output_shape, box2box_transform=stock.box2box_transform
            )
            for head, stock in zip(ret["box_heads"], ret["box_predictors"])
        ]
        return ret
