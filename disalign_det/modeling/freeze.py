"""Stage-two freezing: only the calibration parameters (or also the classifier) train."""

import logging

from torch import nn

__all__ = [
    "CALIBRATION_PARAMETER_NAMES",
    "is_calibration_parameter",
    "is_disalign_state",
    "apply_freeze",
]

logger = logging.getLogger(__name__)

# Module/parameter names that hold DisAlign's calibration (beta, gamma, s(x)).
CALIBRATION_PARAMETER_NAMES = ("logit_scale", "logit_bias", "confidence_layer")
# Persistent buffers of the DisAlign heads (NorCal's training class counts): absent from a stage-one
# checkpoint, like the calibration parameters.
DISALIGN_BUFFER_NAMES = ("class_counts", "fracal_freq", "fracal_dims")  # NorCal, FRACAL
FREEZE_MODES = ("none", "all_but_calibration", "all_but_classifier")


def is_calibration_parameter(name: str) -> bool:
    """True for a parameter name (as in ``model.named_parameters()``) of the calibration."""
    return any(part in CALIBRATION_PARAMETER_NAMES for part in name.split("."))


def is_disalign_state(name: str) -> bool:
    """True for a state-dict key that only DisAlign models have (calibration or its buffers)."""
    return is_calibration_parameter(name) or name.split(".")[-1] in DISALIGN_BUFFER_NAMES


def _is_classifier_parameter(name: str) -> bool:
    return "cls_score" in name.split(".")


def _keep_eval(module, inputs):
    # Forward pre-hook: a frozen normalisation layer always runs in eval mode, so its running
    # statistics are neither used from the batch nor updated, whatever model.train() says.
    module.training = False


def apply_freeze(model: nn.Module, mode: str) -> nn.Module:
    """Freeze ``model`` in place for ``MODEL.DISALIGN.FREEZE = mode`` and return it.

    * "none": nothing changes (stage one).
    * "all_but_calibration": requires_grad is False for everything but the calibration
      parameters (DisAlign stage two).
    * "all_but_classifier": calibration and ``cls_score`` train (classifier re-training ablation).

    Every BatchNorm-like layer with frozen parameters is kept in eval mode, so its buffers stay
    bit-identical to the checkpoint. Raises ValueError if nothing is left to train.
    """
    if mode not in FREEZE_MODES:
        raise ValueError(f"MODEL.DISALIGN.FREEZE must be one of {FREEZE_MODES}, got {mode!r}")
    if mode == "none":
        return model
    trainable = []
    for name, param in model.named_parameters():
        train = is_calibration_parameter(name) or (
            mode == "all_but_classifier" and _is_classifier_parameter(name)
        )
        param.requires_grad_(train)
        if train:
            trainable.append(name)
    if not trainable:
        raise ValueError(
            f"MODEL.DISALIGN.FREEZE={mode!r} leaves nothing to train: the model has no calibration "
            "parameters. Use MODEL.ROI_HEADS.NAME 'DisAlignROIHeads' with "
            "MODEL.DISALIGN.BOX_CALIBRATION True, and/or MODEL.ROI_MASK_HEAD.NAME "
            "'DisAlignMaskRCNNConvUpsampleHead' with MODEL.DISALIGN.MASK_CALIBRATION True."
        )
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and not any(
            p.requires_grad for p in module.parameters(recurse=False)
        ):
            module.eval()
            module.register_forward_pre_hook(_keep_eval)
    num = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "MODEL.DISALIGN.FREEZE=%s: %d trainable tensors (%d values): %s",
        mode,
        len(trainable),
        num,
        ", ".join(trainable),
    )
    return model
