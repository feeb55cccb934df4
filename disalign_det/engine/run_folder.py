"""Checks before a run touches its ``OUTPUT_DIR``, and the run folder's own leftovers.

``tools/train_net.py`` and ``tools/lazyconfig_train_net.py`` call :func:`preflight` /
:func:`preflight_lazy` in ``setup``, before detectron2's ``default_setup`` writes ``config.yaml``
and the log into the output folder: a command that cannot run must not replace an earlier run's
config. They check, in this order,

1. the config's values (``MODEL.ROI_HEADS.NUM_CLASSES`` against the datasets, every value the model
   validates, e.g. ``MODEL.DISALIGN.*``: the model is built on the ``meta`` device, no memory, no
   weights), then
2. the inputs: every training and test dataset's json (structure and values), every image file,
   the test json's categories (:func:`~disalign_det.data.dataset_checks.check_dataset_inputs`), then
3. the run folder: a ``last_checkpoint`` that names a deleted file (with ``--resume``) fails naming
   the checkpoints that are there.

Once every check passed, the tools remove the temporary checkpoint files (``*.tmp.<pid>``) that a
run killed during a save left (:func:`remove_stale_temporaries`), then call ``default_setup``.
"""

import glob
import logging
import os
import re
from typing import List

import torch
from detectron2.utils import comm

from ..data import check_num_classes
from ..data.dataset_checks import check_dataset_inputs
from .checkpoint import check_last_checkpoint
from .strict_load import LAZY_KEYS, precheck_inference_weights

__all__ = [
    "check_config_values",
    "preflight",
    "preflight_lazy",
    "remove_stale_temporaries",
]

logger = logging.getLogger(__name__)

_TMP = re.compile(r"\.tmp\.(\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str) -> List[str]:
    """Remove the ``*.tmp.<pid>`` files in ``folder`` whose process is gone: what a run killed
    during an atomic checkpoint save leaves (a model-sized file). Files of a live process (another
    run saving into this folder right now) are kept; only the main process removes. Returns the
    removed paths (logged)."""
    if not folder or not os.path.isdir(folder) or not comm.is_main_process():
        return []
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.tmp.*"))):
        m = _TMP.search(path)
        if m is None or not os.path.isfile(path):
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            logger.warning("%s belongs to the running process %d: left in place", path, pid)
            continue
        os.remove(path)
        removed.append(path)
    if removed:
        logger.warning(
            "Removed %d temporary checkpoint file(s) left by an interrupted save in %s: %s",
            len(removed),
            folder,
            [os.path.basename(p) for p in removed],
        )
    return removed


def check_config_values(cfg, training: bool = True):
    """Build the model of ``cfg`` on the ``meta`` device (no memory, no weights) and apply its
    freezing and (``training``) class weights: every value the model checks
    (``MODEL.DISALIGN.RHO``, ``FREEZE``, ``POSTHOC``, ...) fails now, naming its key, instead of
    after the output folder is written.

    Only ValueError / KeyError (the named config errors) propagate: a model whose construction
    the meta device does not support is built and checked for real later.

    Returns:
        the model on the meta device, or None when that build was skipped.
    """
    from detectron2.modeling import build_model

    from ..modeling import install_class_weights
    from .loop import freeze_model

    meta_cfg = cfg.clone()
    meta_cfg.defrost()
    meta_cfg.MODEL.DEVICE = "meta"
    try:
        with torch.device("meta"):
            model = build_model(meta_cfg)
            freeze_model(model, cfg.MODEL.DISALIGN.FREEZE)  # as Trainer.build_model
        if training:
            # Outside the meta context: the counts and GRW weights are computed for real (their
            # checks call .item()), then copied into the meta buffers.
            install_class_weights(model, meta_cfg)
    except (ValueError, KeyError):
        raise
    except Exception as e:  # e.g. an op without a meta kernel in a custom backbone
        logger.info("Config pre-check on the meta device skipped (%s: %s)", type(e).__name__, e)
        return None
    return model


def _check_run_folder(out: str, resume: bool) -> None:
    if resume and out:
        check_last_checkpoint(out)


def preflight(cfg, *, resume: bool = False, eval_only: bool = False) -> None:
    """Everything ``tools/train_net.py`` checks before ``default_setup`` writes into
    ``cfg.OUTPUT_DIR`` (see the module docstring). Training datasets are checked unless
    ``eval_only``; test datasets always (the final evaluation runs whenever ``DATASETS.TEST`` is
    not empty)."""
    check_num_classes(cfg)  # registers DATASETS.LVIS_FORMAT first
    model = check_config_values(cfg, training=not eval_only)
    if eval_only and model is not None:
        # The weights --eval-only will load, against the model's tensors (nothing loaded yet).
        precheck_inference_weights(model, cfg.MODEL.WEIGHTS, save_dir=cfg.OUTPUT_DIR, resume=resume)
    if not eval_only:
        for name in cfg.DATASETS.TRAIN:
            check_dataset_inputs(name, "DATASETS.TRAIN")
    for name in cfg.DATASETS.TEST:
        check_dataset_inputs(name, "DATASETS.TEST")
    _check_run_folder(cfg.OUTPUT_DIR, resume)


def _lazy_dataset_names(node) -> List[str]:
    dataset = node.get("dataset") if node is not None and hasattr(node, "get") else None
    names = dataset.get("names") if dataset is not None and hasattr(dataset, "get") else None
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def _meta_lazy_model(cfg, mode):
    """``cfg.model`` instantiated and frozen on the meta device (None where that fails for a
    reason other than a named config error, e.g. ``.item()`` in a ViT's init)."""
    from detectron2.config import instantiate

    from .loop import freeze_model

    try:
        with torch.device("meta"):
            return freeze_model(instantiate(cfg.model), mode)
    except (ValueError, KeyError):
        raise
    except Exception as e:
        logger.info("Model pre-check on the meta device skipped (%s: %s)", type(e).__name__, e)
        return None


def preflight_lazy(cfg, *, resume: bool = False, eval_only: bool = False) -> None:
    """:func:`preflight` for a LazyConfig: ``disalign.freeze``, the model (on the meta device; with
    ``eval_only`` against ``train.init_checkpoint``), the datasets named by
    ``dataloader.train.dataset.names`` / ``dataloader.test.dataset.names`` and
    ``train.output_dir``."""
    from ..lazy.train import freeze_mode
    from ..modeling.freeze import FREEZE_MODES

    mode = freeze_mode(cfg)
    if mode not in FREEZE_MODES:
        raise ValueError(f"disalign.freeze must be one of {FREEZE_MODES}, got {mode!r}")
    model = _meta_lazy_model(cfg, mode)
    if eval_only and model is not None:
        precheck_inference_weights(
            model,
            cfg.train.init_checkpoint,
            save_dir=cfg.train.output_dir,
            resume=resume,
            keys=LAZY_KEYS,
        )
    if not eval_only:
        for name in _lazy_dataset_names(cfg.dataloader.get("train")):
            check_dataset_inputs(name, "dataloader.train.dataset.names")
    if "evaluator" in cfg.dataloader:
        for name in _lazy_dataset_names(cfg.dataloader.get("test")):
            check_dataset_inputs(name, "dataloader.test.dataset.names")
    _check_run_folder(cfg.train.output_dir, resume)
