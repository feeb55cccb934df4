"""ROI heads that swap in the DisAlign box predictor (standard and cascade)."""

import logging

import torch
from detectron2.modeling.roi_heads import (
    ROI_HEADS_REGISTRY,
    CascadeROIHeads,
    StandardROIHeads,
)
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

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


def check_classifier_options(predictor):
    """Refuse detectron2 classifier options that the DisAlign predictor would silently ignore.

    detectron2 main's ``MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE`` (and ``USE_FED_LOSS``, which requires
    it) turn the classifier into per-class sigmoids. The check is behavioural: the predictor's
    ``predict_probs`` must give the stock predictor's probabilities for the same logits (both
    take the already calibrated logits); when it does not, building fails naming the keys
    instead of predicting something else than the stage one. A predictor that implements the
    sigmoid classifier passes it unchanged.
    """
    options = [
        key
        for key, attr in (
            ("MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "use_sigmoid_ce"),
            ("MODEL.ROI_BOX_HEAD.USE_FED_LOSS", "use_fed_loss"),
        )
        if getattr(predictor, attr, False)
    ]
    if not options or getattr(predictor, "posthoc", "none") != "none":
        return
    if getattr(predictor, "stage_one_loss", None) is not None:  # EQLv2 / ECM: their activation
        return
    k = predictor.num_classes
    g = torch.Generator().manual_seed(0)
    # Drawn on the CPU (the same numbers everywhere), then on the predictor's device: a predictor
    # built on (or moved to) a GPU must not meet CPU tensors.
    device = next(predictor.parameters()).device
    scores = (torch.randn(4, k + 1, generator=g) * 3).to(device)
    deltas = torch.zeros(4, 4, device=device)
    proposals = [_Len(4)]
    with torch.no_grad():
        ours = predictor.predict_probs((scores, deltas), proposals)[0]
        stock = FastRCNNOutputLayers.predict_probs(predictor, (scores, deltas), proposals)[0]
    if ours.shape != stock.shape or not torch.allclose(ours, stock, atol=1e-6):
        raise ValueError(
            f"{' / '.join(options)} True: the DisAlign box predictor computes softmax "
            "probabilities, so a sigmoid/federated stage one would not predict what it predicted "
            "in stage one. Set them to False (train the stage one with softmax cross-entropy), or "
            "use a disalign-det that supports the sigmoid classifier."
        )


class _Len:
    """Stands for a list of proposals of one image in ``predict_probs`` (only ``len`` is read)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


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
        check_classifier_options(ret["box_predictor"])
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
        for predictor in ret["box_predictors"]:
            check_classifier_options(predictor)
        return ret
