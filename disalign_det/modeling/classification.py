"""DisAlign for image classification (the paper's first task: ImageNet-LT, iNaturalist 2018,
Places-LT) on detectron2's own ``ResNet``.

:class:`ImageClassifier` (registered in ``META_ARCH_REGISTRY``) is a ResNet trunk (``res5``
features), a global average pool and :class:`DisAlignClassifierHead`: the stock linear classifier
``cls_score`` (its parameter names are those of stage one, so a stage-one checkpoint loads with
only the calibration missing) plus, in stage two, the shared adaptive calibration
(:func:`~.calibration.calibrate_logits`) on the (N, C) logits with ``s(x)`` from the pooled
feature. Training uses the GRW-weighted cross-entropy of :mod:`.losses` (rho = 0 is plain
cross-entropy); the class counts come from the training dataset's metadata
(:func:`classification_class_counts`), read once when the model is built.

When the whole trunk is frozen (stage two, ``apply_freeze``), it runs under ``torch.no_grad()``:
no activation is kept for a backward pass that would only reach frozen parameters.
"""

import logging
import re
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.backbone import BasicStem, BottleneckBlock, ResNet
from detectron2.modeling.backbone.resnet import BasicBlock
from detectron2.utils import comm
from torch import nn

from .calibration import add_calibration, calibrate_logits
from .losses import check_rho, global_normalizer, grw_class_weights, weighted_cross_entropy

__all__ = [
    "DisAlignClassifierHead",
    "ImageClassifier",
    "build_classification_resnet",
    "classification_class_counts",
    "convert_torchvision_resnet",
]

logger = logging.getLogger(__name__)

_LOSSES = ("ce", "grw")
_BLOCKS_PER_STAGE = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


def build_classification_resnet(
    depth: int = 50,
    *,
    num_groups: int = 1,
    width_per_group: int = 64,
    stem_out_channels: int = 64,
    res2_out_channels: Optional[int] = None,
    stride_in_1x1: bool = False,
    norm: str = "BN",
    in_channels: int = 3,
    zero_init_residual: bool = False,
) -> ResNet:
    """detectron2's ``ResNet`` (``res5`` output, no classifier) with torchvision's layout by
    default (stride in the 3x3 conv: ``stride_in_1x1=False``), so torchvision weights convert
    one to one (:func:`convert_torchvision_resnet`).

    Args:
        depth: 18, 34, 50, 101 or 152.
        num_groups, width_per_group: ResNeXt's cardinality and width (32, 4 for ResNeXt-50
            32x4d); the bottleneck of stage i has ``num_groups * width_per_group * 2 ** i``
            channels.
        stem_out_channels, res2_out_channels: widths of the stem and of res2 (default 64 and
            256 for depth >= 50, else 64); later stages double. Smaller values give the CPU
            models of the digits / generated benchmarks.
    """
    if depth not in _BLOCKS_PER_STAGE:
        raise ValueError(f"ResNet depth must be one of {sorted(_BLOCKS_PER_STAGE)}, got {depth}")
    if depth < 50 and (num_groups != 1 or width_per_group != 64):
        raise ValueError(f"ResNet-{depth} has basic blocks: num_groups/width_per_group not used")
    stem = BasicStem(in_channels=in_channels, out_channels=stem_out_channels, norm=norm)
    if res2_out_channels is None:
        res2_out_channels = 256 if depth >= 50 else 64
    stages = []
    in_ch, out_ch = stem_out_channels, res2_out_channels
    bottleneck = num_groups * width_per_group
    if depth >= 50 and res2_out_channels != 256:
        # Scaled-down bottleneck model: keep the standard 4x expansion.
        bottleneck = max(num_groups, res2_out_channels // 4)
    for i, n in enumerate(_BLOCKS_PER_STAGE[depth]):
        kwargs = dict(norm=norm)
        if depth >= 50:
            block = BottleneckBlock
            kwargs.update(
                bottleneck_channels=bottleneck,
                num_groups=num_groups,
                stride_in_1x1=stride_in_1x1,
            )
        else:
            block = BasicBlock
        stages.append(
            ResNet.make_stage(
                block_class=block,
                num_blocks=n,
                stride_per_block=[1 if i == 0 else 2] + [1] * (n - 1),
                in_channels=in_ch,
                out_channels=out_ch,
                **kwargs,
            )
        )
        in_ch, out_ch, bottleneck = out_ch, out_ch * 2, bottleneck * 2
    if zero_init_residual:
        for blocks in stages:
            for b in blocks:
                last = b.conv3 if depth >= 50 else b.conv2
                nn.init.constant_(last.norm.weight, 0.0)
    return ResNet(stem, stages, out_features=["res5"])


class DisAlignClassifierHead(nn.Module):
    """Linear classifier ``cls_score`` plus, with ``calibration``, DisAlign's adaptive calibration
    ``z' = s(x) (beta z + gamma) + (1 - s(x)) z`` with ``s(x) = sigmoid(confidence_layer(x))``.

    ``tau_norm`` > 0 applies tau-normalisation at inference (Kang et al. 2020): each class row
    ``w_j`` of ``cls_score`` divided by ``||w_j|| ** tau`` (bias unchanged); 0 leaves it alone.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        calibration: bool = False,
        confidence_init_std: float = 0.01,
        tau_norm: float = 0.0,
    ):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.constant_(self.cls_score.bias, 0.0)
        self.calibration = bool(calibration)
        if self.calibration:
            add_calibration(self, num_classes, nn.Linear(in_features, 1), confidence_init_std)
        if tau_norm < 0:
            raise ValueError(f"model.head.tau_norm must be >= 0, got {tau_norm}")
        self.tau_norm = float(tau_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, D) pooled features -> (N, C) logits."""
        if self.tau_norm > 0 and not self.training:
            w = self.cls_score.weight
            w = w / w.norm(dim=1, keepdim=True).clamp(min=1e-12).pow(self.tau_norm)
            z = F.linear(x, w, self.cls_score.bias)
        else:
            z = self.cls_score(x)
        if not self.calibration:
            return z
        return calibrate_logits(z, self.confidence_layer(x), self.logit_scale, self.logit_bias)


def classification_class_counts(dataset_names) -> torch.Tensor:
    """(C,) int64 training images per class of ``dataset_names`` (one or several registered
    classification datasets with the same classes), from their metadata
    (``class_image_count``, computed from the list files once)."""
    from detectron2.data import MetadataCatalog

    names = [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)
    total = None
    for name in names:
        counts = getattr(MetadataCatalog.get(name), "class_image_count", None)
        if counts is None:
            raise ValueError(
                f"Dataset {name!r} has no 'class_image_count' metadata: register it with "
                "disalign_det.data.register_classification_dataset"
            )
        counts = torch.as_tensor(counts, dtype=torch.int64)
        if total is not None and counts.numel() != total.numel():
            raise ValueError(f"{names}: datasets with different class counts cannot be mixed")
        total = counts if total is None else total + counts
    return total


@META_ARCH_REGISTRY.register()
class ImageClassifier(nn.Module):
    """ResNet trunk + global average pool + :class:`DisAlignClassifierHead`.

    Input: a list of dicts with ``"image"`` ((3, H, W) uint8 or float in [0, 255], in
    ``input_format``) and, for training, ``"label"`` (int in [0, C)).
    Output: training, ``{"loss_cls": scalar}``; inference, ``[{"logits": (C,)}]`` per image.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        calibration: bool = False,
        confidence_init_std: float = 0.01,
        tau_norm: float = 0.0,
        loss: str = "ce",
        rho: float = 0.0,
        class_counts=None,
        feature: str = "res5",
    ):
        """
        Args:
            backbone: a detectron2 ``Backbone`` whose ``feature`` output is (N, D, h, w).
            num_classes: C.
            pixel_mean, pixel_std: (3,) normalisation in the 0-255 scale of the input.
            calibration, confidence_init_std, tau_norm: see :class:`DisAlignClassifierHead`.
            loss: "ce" or "grw" (cross-entropy weighted by ``(1 / r_j) ** rho``).
            rho: GRW's exponent (the official ImageNet-LT stage two uses 1.2).
            class_counts: (C,) training images per class, needed by "grw" (e.g.
                ``L(classification_class_counts)(dataset_names=...)`` in a LazyConfig).
        """
        super().__init__()
        self.backbone = backbone
        self.feature = feature
        channels = backbone.output_shape()[feature].channels
        self.head = DisAlignClassifierHead(
            channels,
            num_classes,
            calibration=calibration,
            confidence_init_std=confidence_init_std,
            tau_norm=tau_norm,
        )
        self.num_classes = num_classes
        if loss not in _LOSSES:
            raise ValueError(f"model.loss must be one of {_LOSSES}, got {loss!r}")
        self.loss = loss
        self.rho = check_rho(rho)
        # GRW weights: a function of the training data and rho, not a learned state (not saved).
        self.register_buffer("class_weights", torch.ones(num_classes), persistent=False)
        if loss == "grw":
            if class_counts is None:
                raise ValueError("model.loss='grw' needs model.class_counts (training counts)")
            counts = torch.as_tensor(class_counts).flatten()
            if counts.numel() != num_classes:
                raise ValueError(
                    f"model.class_counts has {counts.numel()} classes, model.num_classes is "
                    f"{num_classes}"
                )
            # grw_class_weights appends the detection background (weight 1): not a class here.
            self.class_weights.copy_(grw_class_weights(counts, self.rho)[:-1])
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        # The YAML path: MODEL.RESNETS of detectron2 (DEPTH, NUM_GROUPS, WIDTH_PER_GROUP,
        # STEM_OUT_CHANNELS, RES2_OUT_CHANNELS, STRIDE_IN_1X1, NORM) and MODEL.CLASSIFIER
        # (add_classification_config, called by add_disalign_config).
        r = cfg.MODEL.RESNETS
        c = cfg.MODEL.CLASSIFIER
        return {
            "backbone": build_classification_resnet(
                r.DEPTH,
                num_groups=r.NUM_GROUPS,
                width_per_group=r.WIDTH_PER_GROUP,
                stem_out_channels=r.STEM_OUT_CHANNELS,
                res2_out_channels=r.RES2_OUT_CHANNELS,
                stride_in_1x1=r.STRIDE_IN_1X1,
                norm=r.NORM,
            ),
            "num_classes": c.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "calibration": c.CALIBRATION,
            "confidence_init_std": cfg.MODEL.DISALIGN.CONFIDENCE_INIT_STD,
            "loss": c.LOSS,
            "rho": c.RHO,
            "class_counts": (
                classification_class_counts(cfg.DATASETS.TRAIN) if c.LOSS == "grw" else None
            ),
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def trunk_frozen(self) -> bool:
        """True when no backbone parameter trains (stage two): the trunk then runs without
        autograd."""
        return not any(p.requires_grad for p in self.backbone.parameters())

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W) normalised -> (N, D) pooled ``feature``."""
        grad = torch.is_grad_enabled() and not self.trunk_frozen()
        with torch.set_grad_enabled(grad):
            x = self.backbone(images)[self.feature]
            return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def preprocess(self, batched_inputs) -> torch.Tensor:
        images = [d["image"].to(self.device, non_blocking=True) for d in batched_inputs]
        sizes = {tuple(im.shape) for im in images}
        if len(sizes) != 1:
            raise ValueError(f"ImageClassifier needs images of one size per batch, got {sizes}")
        x = torch.stack(images).float()
        return (x - self.pixel_mean) / self.pixel_std

    def forward(self, batched_inputs):
        logits = self.head(self.features(self.preprocess(batched_inputs)))
        if not self.training:
            return [{"logits": z} for z in logits]
        labels = torch.as_tensor(
            [int(d["label"]) for d in batched_inputs], dtype=torch.int64, device=logits.device
        )
        weights = self.class_weights if self.loss == "grw" else None
        # The mean over the global batch with several processes (as the LVIS losses do).
        normalize = global_normalizer if comm.get_world_size() > 1 else None
        return {"loss_cls": weighted_cross_entropy(logits, labels, weights, normalize)}


def add_classification_config(cfg):
    """``MODEL.CLASSIFIER``: NUM_CLASSES, CALIBRATION, LOSS ("ce"/"grw"), RHO, for
    ``META_ARCH: "ImageClassifier"`` in a YAML config (the LazyConfigs set the same as arguments).
    """
    from detectron2.config import CfgNode as CN

    cfg.MODEL.CLASSIFIER = CN()
    # C, the number of image classes of the linear classifier `head.cls_score`.
    cfg.MODEL.CLASSIFIER.NUM_CLASSES = 1000
    # Adaptive calibration of the (N, C) logits, z'_j = s(x)(beta_j z_j + gamma_j) + (1 - s(x)) z_j
    # with s(x) from the pooled feature (DisAlign stage two).
    cfg.MODEL.CLASSIFIER.CALIBRATION = False
    # Loss: "ce" (plain cross-entropy, stage one) or "grw" (weights w_j = (1 / r_j) ** rho on the
    # classes' training-image ratios r_j, from DATASETS.TRAIN's metadata).
    cfg.MODEL.CLASSIFIER.LOSS = "ce"
    # rho of GRW (official ImageNet-LT value 1.2; 0 gives plain cross-entropy).
    cfg.MODEL.CLASSIFIER.RHO = 0.0


# torchvision -> detectron2 ResNet names. torchvision: conv1/bn1, layer{1-4}.{j}.conv{k}/bn{k},
# layer{i}.{j}.downsample.{0,1}, fc; detectron2: stem.conv1(.norm), res{2-5}.{j}.conv{k}(.norm),
# res{i}.{j}.shortcut(.norm).
_TV_BLOCK_RULES = (
    (r"^conv(\d)\.weight$", r"conv\1.weight"),
    (r"^bn(\d)\.(.*)$", r"conv\1.norm.\2"),
    (r"^downsample\.0\.weight$", r"shortcut.weight"),
    (r"^downsample\.1\.(.*)$", r"shortcut.norm.\1"),
)


def _tv_name(name: str) -> Optional[str]:
    m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", name)
    if m is None:
        if name == "conv1.weight":
            return "stem.conv1.weight"
        if name.startswith("bn1."):
            return "stem.conv1.norm." + name[len("bn1.") :]
        return None
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    prefix = f"res{stage}.{block}."
    for pattern, repl in _TV_BLOCK_RULES:
        if re.match(pattern, rest):
            return prefix + re.sub(pattern, repl, rest)
    return None


def convert_torchvision_resnet(
    state_dict: Dict[str, torch.Tensor], *, keep_fc: bool = False
) -> Dict[str, torch.Tensor]:
    """A torchvision ResNet / ResNeXt ``state_dict`` with :class:`ImageClassifier`'s names
    (``backbone.res2.0.conv1.weight``, ``head.cls_score.weight``, ...).

    ``num_batches_tracked`` is dropped (detectron2's BatchNorm does not use it); ``fc`` becomes
    ``head.cls_score`` only with ``keep_fc`` (ImageNet's 1000-class layer does not fit Places-LT's
    365 classes). Any other unknown key raises ValueError naming it.
    """
    out = {}
    for name, value in state_dict.items():
        if name.endswith("num_batches_tracked"):
            continue
        if name in ("fc.weight", "fc.bias"):
            if keep_fc:
                out["head.cls_score." + name.split(".")[1]] = value
            continue
        new = _tv_name(name)
        if new is None:
            raise ValueError(f"convert_torchvision_resnet: unknown torchvision key {name!r}")
        out["backbone." + new] = value
    return out
