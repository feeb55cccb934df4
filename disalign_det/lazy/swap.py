"""Turn a LazyConfig stage-one model into a DisAlign stage-two model, in the config (no code runs).

Only ``_target_`` classes are swapped and DisAlign's own arguments added: every argument of the
stage one (input shapes, box2box transforms, score thresholds, sigmoid CE / federated loss, ...)
stays as the stage-one config wrote it, so a stage-one checkpoint loads and, at the start of stage
two, predicts exactly what the stage one predicts.
"""

import logging
import os

from detectron2.config import LazyCall as L
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.roi_heads import (
    CascadeROIHeads,
    FastRCNNOutputLayers,
    MaskRCNNConvUpsampleHead,
    StandardROIHeads,
)
from detectron2.utils.registry import locate

from ..modeling import (
    DisAlignCascadeROIHeads,
    DisAlignFastRCNNOutputLayers,
    DisAlignMaskRCNNConvUpsampleHead,
    DisAlignROIHeads,
    DisAlignRPN,
)
from ..modeling.freeze import FREEZE_MODES

__all__ = [
    "DEFAULT_FED_LOSS_FREQ_WEIGHT_POWER",
    "find_project_config",
    "load_project_config",
    "use_disalign",
]

logger = logging.getLogger(__name__)

# The power of ViTDet's LVIS configs (detectron2's MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER).
DEFAULT_FED_LOSS_FREQ_WEIGHT_POWER = 0.5
# The training datasets, resolved from the root of the final config when it is used (after
# command-line overrides).
TRAIN_DATASETS = "${dataloader.train.dataset.names}"
# Per-class scalars of the calibration: decaying beta towards 0 would change the calibrated
# function itself (beta = 1 is the identity), so they get no weight decay (AdamW's 0.1 in ViTDet).
_NO_DECAY = ("logit_scale", "logit_bias")

ENV_DETECTRON2_ROOT = "DETECTRON2_ROOT"


def _target(node):
    t = node.get("_target_") if hasattr(node, "get") else None
    return locate(t) if isinstance(t, str) else t


def _swap_target(node, key, stock, ours, strict):
    """Replace ``node._target_`` ``stock`` by ``ours``; True if the node is (now) ``ours``."""
    t = _target(node)
    if isinstance(t, type) and issubclass(t, ours):
        return True
    if t is stock:
        node._target_ = ours
        return True
    if strict:
        raise ValueError(
            f"{key}._target_ is {t!r}; DisAlign replaces detectron2's {stock.__name__} (or uses "
            f"{ours.__name__} as is). A subclass of your own would lose its behaviour: make it "
            f"derive from {ours.__name__} instead."
        )
    logger.warning("%s._target_ is %r, not %s: left unchanged", key, t, stock.__name__)
    return False


def _swap_box_predictor(node, key, box_args, fed_loss_power):
    _swap_target(node, key, FastRCNNOutputLayers, DisAlignFastRCNNOutputLayers, strict=True)
    node.update(box_args)
    if node.get("use_fed_loss", False):
        # The stage one's closure reads the dataset names of the config module it was written in,
        # not of the final config: re-bind it to dataloader.train.dataset.names.
        node.get_fed_loss_cls_weights = L(_FedLossClassWeights)(
            dataset_names=TRAIN_DATASETS, freq_weight_power=fed_loss_power
        )


class _FedLossClassWeights:
    """The ``get_fed_loss_cls_weights`` callable of the box predictor: detectron2's
    ``get_fed_loss_cls_weights`` for the given datasets and power (a class, so that configs with it
    can still be saved)."""

    def __init__(self, dataset_names, freq_weight_power):
        self.dataset_names = (
            dataset_names if isinstance(dataset_names, str) else list(dataset_names)
        )
        self.freq_weight_power = freq_weight_power

    def __call__(self):
        # detectron2 main only (v0.6 has no federated loss, hence no such config either).
        from detectron2.data.detection_utils import get_fed_loss_cls_weights

        return get_fed_loss_cls_weights(self.dataset_names, self.freq_weight_power)


def use_disalign(
    model,
    dataloader=None,
    optimizer=None,
    *,
    rho=0.8,
    cls_loss="grw",
    mask_loss="grw",
    box_calibration=True,
    mask_calibration=True,
    confidence_init_std=0.01,
    frequency_source="instance_count",
    freeze="all_but_calibration",
    fed_loss_freq_weight_power=DEFAULT_FED_LOSS_FREQ_WEIGHT_POWER,
    repeat_factor_sampling=False,
):
    """Make the LazyConfig ``model`` (a ``GeneralizedRCNN`` node) a DisAlign stage-two model, in
    place, and return the ``disalign`` config node for the training entry point.

    * ``roi_heads.box_predictor`` (StandardROIHeads) or every ``roi_heads.box_predictors[i]``
      (CascadeROIHeads): ``FastRCNNOutputLayers`` -> :class:`DisAlignFastRCNNOutputLayers` with
      ``calibrate``, ``cls_loss``, ``rho``; with the federated loss, its class weights are re-bound
      to ``dataloader.train.dataset.names`` (power ``fed_loss_freq_weight_power``).
    * ``roi_heads.mask_head``: ``MaskRCNNConvUpsampleHead`` ->
      :class:`DisAlignMaskRCNNConvUpsampleHead`.
    * ``roi_heads`` -> :class:`DisAlignROIHeads` / :class:`DisAlignCascadeROIHeads` and the ``RPN``
      -> :class:`DisAlignRPN` (same computation; they skip the losses of frozen branches).
    * ``dataloader.train.sampler`` is removed (detectron2's default ``TrainingSampler``) unless
      ``repeat_factor_sampling``: the official stage two samples without repeat factors.
    * ``optimizer.params.overrides``: no weight decay on beta and gamma.

    Args:
        model, dataloader, optimizer: the config nodes of the stage-one config (``dataloader`` and
            ``optimizer`` may be None to leave them alone).
        rho, cls_loss, mask_loss, box_calibration, mask_calibration, confidence_init_std,
        frequency_source, freeze: as ``MODEL.DISALIGN.*`` of the YAML configs.

    Returns:
        dict: assign it to ``disalign`` at the top level of the config file.
    """
    if freeze not in FREEZE_MODES:
        raise ValueError(f"use_disalign(freeze=...) must be one of {FREEZE_MODES}, got {freeze!r}")
    roi_heads = model.get("roi_heads") if hasattr(model, "get") else None
    if roi_heads is None:
        raise ValueError(
            "use_disalign: model has no roi_heads: DisAlign needs a (Cascade) R-CNN config "
            "(model = L(GeneralizedRCNN)(..., roi_heads=L(StandardROIHeads)(...)))."
        )
    box_args = dict(calibrate=box_calibration, confidence_init_std=confidence_init_std)
    box_args.update(cls_loss=cls_loss, rho=rho)
    if "box_predictors" in roi_heads:
        _swap_target(roi_heads, "model.roi_heads", CascadeROIHeads, DisAlignCascadeROIHeads, False)
        for i, node in enumerate(roi_heads.box_predictors):
            key = f"model.roi_heads.box_predictors[{i}]"
            _swap_box_predictor(node, key, box_args, fed_loss_freq_weight_power)
    elif "box_predictor" in roi_heads:
        _swap_target(roi_heads, "model.roi_heads", StandardROIHeads, DisAlignROIHeads, False)
        _swap_box_predictor(
            roi_heads.box_predictor,
            "model.roi_heads.box_predictor",
            box_args,
            fed_loss_freq_weight_power,
        )
    else:
        raise ValueError(
            "use_disalign: model.roi_heads has neither box_predictor nor box_predictors"
        )

    mask_head = roi_heads.get("mask_head")
    if mask_head is not None:
        _swap_target(
            mask_head,
            "model.roi_heads.mask_head",
            MaskRCNNConvUpsampleHead,
            DisAlignMaskRCNNConvUpsampleHead,
            strict=True,
        )
        mask_head.update(
            calibrate=mask_calibration,
            confidence_init_std=confidence_init_std,
            mask_loss=mask_loss,
            rho=rho,
            # K of beta and gamma also for class-agnostic masks (num_classes 1).
            num_calibrated_classes="${..num_classes}",
        )
    proposal_generator = model.get("proposal_generator")
    if proposal_generator is not None:
        _swap_target(proposal_generator, "model.proposal_generator", RPN, DisAlignRPN, False)

    if dataloader is not None and not repeat_factor_sampling and "sampler" in dataloader.train:
        dataloader.train.pop("sampler")
    if optimizer is not None and "params" in optimizer:
        overrides = dict(optimizer.params.get("overrides") or {})
        for name in _NO_DECAY:
            overrides[name] = dict(overrides.get(name) or {}, weight_decay=0.0)
        optimizer.params.overrides = overrides
    return dict(
        freeze=freeze,
        frequency_source=frequency_source,
        train_datasets=TRAIN_DATASETS,
    )


def _project_config_candidates(project, relpath):
    roots = []
    if os.environ.get(ENV_DETECTRON2_ROOT):
        roots.append(os.environ[ENV_DETECTRON2_ROOT])
    import detectron2

    # A source checkout imported in place (or installed in development mode).
    roots.append(os.path.dirname(os.path.dirname(os.path.abspath(detectron2.__file__))))
    return [os.path.join(r, "projects", project, "configs", relpath) for r in roots]


def find_project_config(relpath, project="ViTDet"):
    """Path of ``projects/<project>/configs/<relpath>`` in a detectron2 checkout (``pip install``
    of detectron2 ships ``configs/`` but not the projects' configs).

    The checkout is ``$DETECTRON2_ROOT`` if set, else the folder above the imported ``detectron2``
    package (a source checkout used in place). Raises FileNotFoundError naming what was searched.
    """
    candidates = _project_config_candidates(project, relpath)
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{project}'s config {relpath!r} was not found (searched: {candidates}). The detectron2 "
        f"package does not install projects/{project}/configs: set {ENV_DETECTRON2_ROOT} to a "
        f"detectron2 source checkout (the folder that has projects/{project}), e.g. "
        f"{ENV_DETECTRON2_ROOT}=$HOME/detectron2."
    )


def load_project_config(relpath, project="ViTDet"):
    """``LazyConfig.load`` of :func:`find_project_config` ``(relpath, project)``."""
    from detectron2.config import LazyConfig

    return LazyConfig.load(find_project_config(relpath, project))
