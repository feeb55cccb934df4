"""DisAlign for detectron2's LazyConfig (Python) configs, e.g. ViTDet's LVIS models.

A stage-two config is the stage-one config plus one call::

    from .my_stage_one import dataloader, lr_multiplier, model, optimizer, train
    from disalign_det.lazy import use_disalign

    disalign = use_disalign(model, dataloader, optimizer)
    set_stage_two_schedule(train, lr_multiplier, dataloader)  # the official one, scaled to batch

:func:`use_disalign` swaps the DisAlign box predictor(s) and mask head into ``model`` (keeping every
argument of the stage one's), drops repeat-factor sampling and returns the ``disalign`` node that
``tools/lazyconfig_train_net.py`` reads: it instantiates the model, freezes everything but the
calibration (:func:`disalign_det.engine.loop.freeze_model`, as the YAML path does), installs the
GRW class weights computed once from ``dataloader.train.dataset.names`` and loads the stage one
strictly (only calibration keys may be missing). :func:`load_project_config` loads a config of a
detectron2 project (ViTDet) that the installed detectron2 package does not ship.
"""

from .recipe import OFFICIAL_STAGE_TWO, set_stage_two_schedule
from .swap import (
    DEFAULT_FED_LOSS_FREQ_WEIGHT_POWER,
    find_project_config,
    load_project_config,
    use_disalign,
)
from .train import LazyTrainer, build_stage_two_model, install_lazy_class_weights

__all__ = [
    "DEFAULT_FED_LOSS_FREQ_WEIGHT_POWER",
    "LazyTrainer",
    "OFFICIAL_STAGE_TWO",
    "build_stage_two_model",
    "find_project_config",
    "install_lazy_class_weights",
    "load_project_config",
    "set_stage_two_schedule",
    "use_disalign",
]
