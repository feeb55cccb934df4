"""DisAlign mask head: calibrated per-class mask logits, computed only for the channels used."""

import logging

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    MaskRCNNConvUpsampleHead,
    mask_rcnn_inference,
)
from detectron2.utils.events import get_event_storage
from torch import nn

from .calibration import add_calibration, calibrate_logits, confidence_logit
from .class_weights import ClassFrequencyMixin
from .losses import weighted_mask_bce

__all__ = ["DisAlignMaskRCNNConvUpsampleHead"]

logger = logging.getLogger(__name__)

_MASK_LOSSES = ("bce", "grw")


@ROI_MASK_HEAD_REGISTRY.register()
class DisAlignMaskRCNNConvUpsampleHead(ClassFrequencyMixin, MaskRCNNConvUpsampleHead):
    """``MaskRCNNConvUpsampleHead`` with DisAlign's adaptive calibration of the mask logits:

        m'_k(p) = s(p) (beta_k m_k(p) + gamma_k) + (1 - s(p)) m_k(p),
        s(p) = sigmoid(confidence_layer(f)(p)),

    where f is the (R, C, M, M) feature map the 1x1 ``predictor`` reads and ``confidence_layer`` is
    a 1x1 conv to one channel. Parameter names of the stock head are unchanged, so stage-one
    checkpoints load; the calibration adds ``logit_scale`` (K,), ``logit_bias`` (K,) and
    ``confidence_layer``.

    Only the channel that is used is ever computed: the ground-truth class in training, the
    predicted class at inference. The stock head evaluates all K channels of the predictor, an
    (R, K, M, M) tensor (K = 1203 on LVIS), and then keeps one; here the predictor's weight row of
    that class is applied directly, which gives the same numbers at a fraction of the cost.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        num_classes,
        calibrate: bool = True,
        confidence_init_std: float = 0.01,
        mask_loss: str = "bce",
        class_weights=None,
        rho: float = 0.8,
        num_calibrated_classes=None,
        **kwargs,
    ):
        """
        Args:
            input_shape, num_classes, **kwargs: as for ``MaskRCNNConvUpsampleHead`` (num_classes
                is 1 for class-agnostic masks).
            calibrate: add the calibration parameters.
            confidence_init_std: std of the normal init of the confidence conv's weight.
            mask_loss: "bce" (stock loss) or "grw" (per-RoI loss weighted by the GRW weight of the
                RoI's ground-truth class, weighted mean).
            class_weights: (K + 1,) GRW weights (background last) for "grw"; without them they
                are installed when training starts (:func:`~.class_weights.install_class_weights`).
            rho: the GRW exponent used when the weights are installed from class counts.
            num_calibrated_classes: K, the number of foreground classes (defaults to num_classes;
                differs for class-agnostic masks, which still get per-class beta and gamma).
        """
        super().__init__(input_shape, num_classes=num_classes, **kwargs)
        K = num_calibrated_classes or num_classes
        self.calibrate = calibrate
        if calibrate:
            # Registered after `predictor`; `_features` stops at the predictor, so the
            # nn.Sequential iteration of the stock `layers` never reaches these modules.
            add_calibration(
                self,
                K,
                nn.Conv2d(self.predictor.in_channels, 1, kernel_size=1),
                confidence_init_std,
            )
        self.mask_loss = mask_loss
        self._init_class_weights(
            mask_loss, _MASK_LOSSES, "MODEL.DISALIGN.MASK_LOSS", class_weights, K, rho
        )

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        d = cfg.MODEL.DISALIGN
        ret.update(
            calibrate=d.MASK_CALIBRATION,
            confidence_init_std=d.CONFIDENCE_INIT_STD,
            mask_loss=d.MASK_LOSS,
            rho=d.RHO,
            num_calibrated_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
        )
        return ret

    def _features(self, x):
        """(R, C_in, P, P) pooled features -> (R, C, M, M), the predictor's input."""
        for name, layer in self.named_children():
            if name == "predictor":
                break
            x = layer(x)
        return x

    def _used_channel_logits(self, feats, classes):
        """(R, C, M, M) features, (R,) classes -> (R, M, M) calibrated logits of those classes."""
        weight = self.predictor.weight
        if weight.shape[0] == 1:  # class-agnostic
            logits = self.predictor(feats)[:, 0]
        else:
            w = weight[classes, :, 0, 0]  # (R, C)
            logits = torch.einsum("rchw,rc->rhw", feats, w)
            if self.predictor.bias is not None:
                logits = logits + self.predictor.bias[classes][:, None, None]
        if self.calibrate:
            logits = calibrate_logits(
                logits,
                confidence_logit(self.confidence_layer, feats)[:, 0],
                self.logit_scale[classes][:, None, None],
                self.logit_bias[classes][:, None, None],
            )
        return logits

    def forward(self, x, instances):
        """
        Args:
            x: (R, C_in, P, P) pooled RoI features.
            instances (list[Instances]): foreground proposals with ``gt_classes``/``gt_masks`` in
                training; predictions with ``pred_classes`` at inference.

        Returns:
            ``{"loss_mask": scalar}`` in training (empty when nothing behind it trains); the
            instances with ``pred_masks`` (Ri, 1, M, M) at inference.
        """
        if self.training:
            trainable = x.requires_grad or any(p.requires_grad for p in self.parameters())
            if not trainable:
                return {}
            return {"loss_mask": self._loss(self._features(x), instances) * self.loss_weight}
        feats = self._features(x)
        classes = cat([i.pred_classes for i in instances]) if len(instances) else None
        if classes is None or classes.numel() == 0:
            logits = feats.new_zeros((0, 1) + feats.shape[2:])
        else:
            logits = self._used_channel_logits(feats, classes)[:, None]
        # (R, 1, M, M) logits: the class-agnostic path of the stock inference (sigmoid, split).
        mask_rcnn_inference(logits, instances)
        return instances

    def _loss(self, feats, instances):
        class_weights = self.grw_weights()  # raises first if GRW weights are missing
        side = feats.shape[-1]  # M: the predictor is a 1x1 conv, so logits are M x M too
        gt_classes, gt_masks = [], []
        for inst in instances:
            if len(inst) == 0:
                continue
            gt_classes.append(inst.gt_classes.to(dtype=torch.int64))
            gt_masks.append(
                inst.gt_masks.crop_and_resize(inst.proposal_boxes.tensor, side).to(feats.device)
            )
        normalize = self.loss_normalizer()
        if not gt_masks:
            # No foreground RoI: a zero that keeps every calibration parameter in the graph (and
            # takes part in the other processes' all-reduce of the weight sum).
            if normalize is not None:
                normalize(feats.new_zeros(()))
            zero = feats.float().sum() * 0.0
            for p in self.parameters():
                if p.requires_grad:
                    zero = zero + p.sum() * 0.0
            return zero
        gt_classes = cat(gt_classes, dim=0)
        gt_masks = cat(gt_masks, dim=0)
        logits = self._used_channel_logits(feats, gt_classes)
        gt_bool = gt_masks if gt_masks.dtype == torch.bool else gt_masks > 0.5
        self._log_accuracy(logits, gt_bool)
        self._visualize(logits, gt_bool)
        weights = None if class_weights is None else class_weights[gt_classes]
        return weighted_mask_bce(logits, gt_bool, weights, normalize)

    def _visualize(self, logits, gt_bool):
        # VIS_PERIOD: the images detectron2's mask_rcnn_loss stores (prediction | ground truth).
        if self.vis_period <= 0:
            return
        storage = get_event_storage()
        if storage.iter % self.vis_period == 0:
            vis = torch.cat([logits.detach().sigmoid(), gt_bool.to(logits.dtype)], dim=2)
            name = "Left: mask prediction;   Right: mask GT"
            for idx, mask in enumerate(vis):
                storage.put_image(name + f" ({idx})", torch.stack([mask] * 3, dim=0))

    @staticmethod
    def _log_accuracy(logits, gt_bool):
        # The same training statistics as detectron2's mask_rcnn_loss.
        with torch.no_grad():
            incorrect = (logits > 0.0) != gt_bool
            num_pos = gt_bool.sum().item()
            storage = get_event_storage()
            storage.put_scalar(
                "mask_rcnn/accuracy", 1 - incorrect.sum().item() / max(incorrect.numel(), 1.0)
            )
            storage.put_scalar(
                "mask_rcnn/false_positive",
                (incorrect & ~gt_bool).sum().item() / max(gt_bool.numel() - num_pos, 1.0),
            )
            storage.put_scalar(
                "mask_rcnn/false_negative", (incorrect & gt_bool).sum().item() / max(num_pos, 1.0)
            )
