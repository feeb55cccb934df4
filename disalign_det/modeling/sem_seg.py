"""DisAlign heads for semantic segmentation (the paper's Sec. 4.2 on ADE20K), registered in
detectron2's ``SEM_SEG_HEADS_REGISTRY``:

* ``DisAlignSemSegFPNHead``: detectron2's Semantic FPN head (``SemSegFPNHead``);
* ``DisAlignDeepLabV3PlusHead`` / ``DisAlignDeepLabV3Head``: the heads of
  ``detectron2.projects.deeplab`` (shipped by both detectron2s we support).

Each subclasses the stock head and keeps its parameter names, so a stock stage-one checkpoint loads
with only the calibration missing. Per pixel p and class c the predictor's logits z_c(p) become

    z'_c(p) = s(p) (beta_c z_c(p) + gamma_c) + (1 - s(p)) z_c(p),   s(p) = sigmoid(conv1x1(x)(p)),

computed by :func:`~.calibration.calibrate_logits` at the head's logit resolution (before the
upsampling to the input size), with beta, gamma of shape (1, C, 1, 1) and the confidence layer a
1x1 convolution on the features x the predictor sees. The calibration lives in the predictor
(:class:`CalibratedConv2d`: ``predictor.logit_scale``, ``predictor.logit_bias``,
``predictor.confidence_layer``), whose own ``weight`` / ``bias`` keep their stock names.

The loss is detectron2's per-pixel cross-entropy with the ignore label, or (``MODEL.DISALIGN.
SEM_SEG_LOSS "grw"``) the same weighted by the GRW weights of the classes' training pixel
frequencies, normalised by the sum of the weights of the non-ignored pixels (rho = 0: the stock
loss).
"""

import logging

import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead

from .calibration import add_calibration, calibrate_logits
from .class_weights import ClassFrequencyMixin
from .losses import upsampled_cross_entropy, weighted_cross_entropy

__all__ = [
    "CalibratedConv2d",
    "DisAlignSemSegFPNHead",
    "DisAlignDeepLabV3PlusHead",
    "DisAlignDeepLabV3Head",
    "deeplab_project",
    "SEM_SEG_LOSSES",
]

logger = logging.getLogger(__name__)

SEM_SEG_LOSSES = ("ce", "grw")


def deeplab_project(setting: str):
    """``detectron2.projects.deeplab``, or ImportError naming the config ``setting`` that needs it
    (e.g. ``"MODEL.SEM_SEG_HEAD.NAME 'DisAlignDeepLabV3PlusHead'"``).

    Both detectron2s we support ship it (the PyPI v0.6 and main); a detectron2 without it cannot
    build the DeepLab heads."""
    try:
        import detectron2.projects.deeplab as deeplab
    except ImportError as e:
        raise ImportError(
            f"{setting} needs detectron2.projects.deeplab, which this detectron2 does not "
            f"provide ({e}). Install a detectron2 that ships its projects, or use "
            "MODEL.SEM_SEG_HEAD.NAME 'DisAlignSemSegFPNHead' (and another "
            "SOLVER.LR_SCHEDULER_NAME)."
        ) from e
    return deeplab


class CalibratedConv2d(Conv2d):
    """The 1x1 predictor conv of a segmentation head followed by DisAlign's calibration.

    Attributes (beyond the stock ``weight`` (C, D, 1, 1) and ``bias`` (C,)):
        logit_scale: (C,) beta, ones at init.
        logit_bias: (C,) gamma, zeros at init.
        confidence_layer: Conv2d(D, 1, 1), weight ~ N(0, init_std), bias 0.
    """

    def __init__(self, in_channels, out_channels, *, init_std, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size=1, **kwargs)
        add_calibration(self, out_channels, Conv2d(in_channels, 1, kernel_size=1), init_std)

    @classmethod
    def from_conv(cls, conv: Conv2d, init_std: float) -> "CalibratedConv2d":
        """A calibrated copy of the stock predictor ``conv`` (same weight and bias values)."""
        if conv.kernel_size != (1, 1) or conv.norm is not None or conv.activation is not None:
            raise ValueError(f"DisAlign calibrates a plain 1x1 predictor conv, got {conv}")
        out = cls(conv.in_channels, conv.out_channels, init_std=init_std)
        out.weight.data.copy_(conv.weight.data)
        out.bias.data.copy_(conv.bias.data)
        return out.to(conv.weight.device)

    def forward(self, x):
        """x: (N, D, H, W) features -> (N, C, H, W) calibrated logits."""
        z = super().forward(x)
        shape = (1, -1, 1, 1)
        return calibrate_logits(
            z,
            self.confidence_layer(x),
            self.logit_scale.view(shape),
            self.logit_bias.view(shape),
        )


class _DisAlignSemSegMixin(ClassFrequencyMixin):
    """What the three heads share: the calibrated predictor and the (GRW) pixel loss.

    Goes before the stock head in the bases, so its ``losses`` overrides the stock one.

    ``fused_pixel_loss`` (True): the GRW loss is :func:`~.losses.upsampled_cross_entropy`, with
    its own backward; False: ``F.interpolate`` and :func:`~.losses.weighted_cross_entropy` through
    autograd (the same loss and gradients up to float rounding;
    ``tools/benchmark_speed_sem_seg.py`` times both)."""

    fused_pixel_loss = True

    def _init_disalign(self, *, calibration, confidence_init_std, sem_seg_loss, rho):
        num_classes = self.predictor.out_channels
        if calibration:
            self.predictor = CalibratedConv2d.from_conv(self.predictor, confidence_init_std)
        self._init_class_weights(
            sem_seg_loss, SEM_SEG_LOSSES, "MODEL.DISALIGN.SEM_SEG_LOSS", None, num_classes, rho
        )
        # ClassFrequencyMixin's weights have a background slot last; a segmentation head has none
        # (every class is a "foreground" class), so only the first C weights are used.

    @classmethod
    def from_config(cls, cfg, input_shape):
        # The stock head's arguments plus the DisAlign ones (configurable heads only).
        ret = super().from_config(cfg, input_shape)
        ret.update(_disalign_kwargs(cfg))
        return ret

    def pixel_class_weights(self):
        """(C,) class weights of the loss, or None for the stock loss."""
        w = self.grw_weights()
        return None if w is None else w[:-1]

    def losses(self, predictions, targets):
        """predictions: (N, C, H / s, W / s) logits at the head's stride s; targets: (N, H, W)
        int64 labels with ``ignore_value``. Returns {"loss_sem_seg": scalar}."""
        if not self.uses_grw:
            return super().losses(predictions, targets)
        # The stock heads upsample the logits to the input size and take the per-pixel loss there;
        # upsampled_cross_entropy does the same pixel-major with a backward of its own (the same
        # gradients without autograd's slow full-resolution kernels: a stage-two iteration's speed).
        if not self.fused_pixel_loss:  # autograd's, for comparison (speed tool, tests)
            predictions = F.interpolate(
                predictions.float(),
                scale_factor=self.common_stride,
                mode="bilinear",
                align_corners=False,
            )
            loss = weighted_cross_entropy(
                predictions,
                targets,
                self.pixel_class_weights(),
                normalize=self.loss_normalizer(),
                ignore_index=self.ignore_value,
            )
        else:
            loss = upsampled_cross_entropy(
                predictions,
                targets,
                self.common_stride,
                self.pixel_class_weights(),
                normalize=self.loss_normalizer(),
                ignore_index=self.ignore_value,
            )
        return {"loss_sem_seg": loss * self.loss_weight}


def _disalign_kwargs(cfg):
    return {
        "calibration": cfg.MODEL.DISALIGN.SEM_SEG_CALIBRATION,
        "confidence_init_std": cfg.MODEL.DISALIGN.CONFIDENCE_INIT_STD,
        "sem_seg_loss": cfg.MODEL.DISALIGN.SEM_SEG_LOSS,
        "rho": cfg.MODEL.DISALIGN.RHO,
    }


@SEM_SEG_HEADS_REGISTRY.register()
class DisAlignSemSegFPNHead(_DisAlignSemSegMixin, SemSegFPNHead):
    """detectron2's Semantic FPN head with DisAlign's calibration and GRW pixel loss."""

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        calibration: bool = True,
        confidence_init_std: float = 0.01,
        sem_seg_loss: str = "ce",
        rho: float = 0.0,
        **kwargs,
    ):
        super().__init__(input_shape, **kwargs)
        self._init_disalign(
            calibration=calibration,
            confidence_init_std=confidence_init_std,
            sem_seg_loss=sem_seg_loss,
            rho=rho,
        )


def _deeplab_heads():
    deeplab = deeplab_project("MODEL.SEM_SEG_HEAD.NAME 'DisAlignDeepLabV3PlusHead'")

    class DisAlignDeepLabV3PlusHead(_DisAlignSemSegMixin, deeplab.DeepLabV3PlusHead):
        """DeepLabV3+ (``detectron2.projects.deeplab``) with DisAlign's calibration and GRW loss.

        GRW needs ``MODEL.SEM_SEG_HEAD.LOSS_TYPE "cross_entropy"`` (the hard-pixel-mining loss
        selects pixels by their loss, which a class weight would bias)."""

        @configurable
        def __init__(
            self,
            input_shape,
            *,
            calibration: bool = True,
            confidence_init_std: float = 0.01,
            sem_seg_loss: str = "ce",
            rho: float = 0.0,
            **kwargs,
        ):
            super().__init__(input_shape, **kwargs)
            if self.decoder_only:
                raise ValueError(
                    "DisAlignDeepLabV3PlusHead needs a predictor: set "
                    "MODEL.SEM_SEG_HEAD.NUM_CLASSES (the decoder-only head has no logits)"
                )
            _check_loss_type(self.loss_type, sem_seg_loss)
            self._init_disalign(
                calibration=calibration,
                confidence_init_std=confidence_init_std,
                sem_seg_loss=sem_seg_loss,
                rho=rho,
            )

        @classmethod
        def from_config(cls, cfg, input_shape):
            ret = super().from_config(cfg, input_shape)
            if cfg.MODEL.SEM_SEG_HEAD.ASPP_GLOBAL_POOLING:
                # No train_size: the ASPP's image branch pools the whole map, at any input size.
                ret["train_size"] = None
            return ret

    class DisAlignDeepLabV3Head(_DisAlignSemSegMixin, deeplab.DeepLabV3Head):
        """DeepLabV3 (``detectron2.projects.deeplab``; its constructor takes the config) with
        DisAlign's calibration and GRW loss."""

        def __init__(self, cfg, input_shape):
            if cfg.MODEL.SEM_SEG_HEAD.ASPP_GLOBAL_POOLING:
                raise ValueError(
                    "MODEL.SEM_SEG_HEAD.ASPP_GLOBAL_POOLING is honoured by "
                    "DisAlignDeepLabV3PlusHead only; DisAlignDeepLabV3Head pools a window of the "
                    "crop size (INPUT.CROP.SIZE), as detectron2's DeepLabV3Head"
                )
            super().__init__(cfg, input_shape)
            kwargs = _disalign_kwargs(cfg)
            _check_loss_type(self.loss_type, kwargs["sem_seg_loss"])
            self._init_disalign(**kwargs)

    return DisAlignDeepLabV3PlusHead, DisAlignDeepLabV3Head


def _check_loss_type(loss_type, sem_seg_loss):
    if sem_seg_loss == "grw" and loss_type != "cross_entropy":
        raise ValueError(
            "MODEL.DISALIGN.SEM_SEG_LOSS 'grw' weights the per-pixel cross-entropy: set "
            f"MODEL.SEM_SEG_HEAD.LOSS_TYPE 'cross_entropy' (got {loss_type!r}), or "
            "MODEL.DISALIGN.SEM_SEG_LOSS 'ce'"
        )


try:
    DisAlignDeepLabV3PlusHead, DisAlignDeepLabV3Head = _deeplab_heads()
except ImportError:  # a detectron2 without its projects: registered names that say why

    def _missing(name):
        def build(cfg, input_shape):
            deeplab_project(f"MODEL.SEM_SEG_HEAD.NAME {name!r}")  # raises, naming the key

        build.__name__ = name
        return build

    DisAlignDeepLabV3PlusHead = _missing("DisAlignDeepLabV3PlusHead")
    DisAlignDeepLabV3Head = _missing("DisAlignDeepLabV3Head")

SEM_SEG_HEADS_REGISTRY.register(DisAlignDeepLabV3PlusHead)
SEM_SEG_HEADS_REGISTRY.register(DisAlignDeepLabV3Head)


def is_sem_seg(cfg) -> bool:
    """True for a config of detectron2's ``SemanticSegmentor``."""
    return cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor"


def build_sem_seg_lr_scheduler(cfg, optimizer):
    """DeepLab's scheduler for ``SOLVER.LR_SCHEDULER_NAME "WarmupPolyLR"``; None otherwise."""
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupPolyLR":
        return None
    deeplab = deeplab_project("SOLVER.LR_SCHEDULER_NAME 'WarmupPolyLR'")
    return deeplab.build_lr_scheduler(cfg, optimizer)
