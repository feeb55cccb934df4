"""Loading weights for inference (``--eval-only``, export, visualisation, ``DisAlignPredictor``)
with the strictness of DisAlign stage two.

detectron2 loads any checkpoint for inference: tensors of another shape or name are skipped with a
"Skip loading parameter" warning and the model evaluates randomly initialised heads (with exit
status 0 and a ``metrics_final.json``). Here anything but an exact match of the model is an error
that names the mismatched tensors and the config key to change, and a model with no weights at
all is a loud warning, or, when evaluating (``--eval-only``), an error for a DisAlign model (its
calibration would be evaluated at its identity initialisation on top of a random network).
"""

import logging
import os
from typing import Optional

from detectron2.engine import DefaultPredictor

from ..modeling.freeze import DISALIGN_BUFFER_NAMES, is_disalign_state
from .checkpoint import DisAlignCheckpointer

__all__ = [
    "DisAlignPredictor",
    "InferenceCheckpointer",
    "load_for_inference",
    "precheck_inference_weights",
]

logger = logging.getLogger(__name__)

YAML_KEYS = {"weights": "MODEL.WEIGHTS", "num_classes": "MODEL.ROI_HEADS.NUM_CLASSES"}
LAZY_KEYS = {"weights": "train.init_checkpoint", "num_classes": "model.roi_heads.num_classes"}
SHOW = 8


class InferenceCheckpointer(DisAlignCheckpointer):
    """:class:`DisAlignCheckpointer` that loads only a checkpoint matching the model exactly:
    same tensor names, same shapes (the stage-two shape check, :meth:`_check_stage_one`), nothing
    missing, nothing unexpected.

    Args:
        keys: the config keys the messages name, ``{"weights": ..., "num_classes": ...}``
            (:data:`YAML_KEYS` or :data:`LAZY_KEYS`).
    """

    def __init__(self, model, save_dir="", *, keys=None, **checkpointables):
        super().__init__(model, save_dir, strict_stage_one=False, **checkpointables)
        self.keys = dict(keys or YAML_KEYS)
        self._path = None
        # True: load() reads and checks the file but loads nothing (the model may be on "meta").
        self.dry_run = False

    def load(self, path, checkpointables=None):
        self._path = path
        return super().load(path, checkpointables=checkpointables)

    def _in_keys(self, message: str) -> str:
        # The stage-two messages name the YAML keys.
        for k, yaml_key in YAML_KEYS.items():
            message = message.replace(yaml_key, self.keys[k])
        return message

    def _load_model(self, checkpoint):
        heuristics = checkpoint.get("matching_heuristics", False)
        if not heuristics:
            self.check_exact(checkpoint["model"])  # before loading: no "Skip loading" warnings
        if self.dry_run:  # precheck_inference_weights: nothing is loaded
            return None
        incompatible = super()._load_model(checkpoint)
        shapes = list(getattr(incompatible, "incorrect_shapes", ()) or ())
        missing = _not_derivable(list(incompatible.missing_keys))
        self._raise_if(shapes, missing, incompatible.unexpected_keys)
        return incompatible

    def check_exact(self, state):
        """ValueError unless the state dict ``state`` has exactly the model's tensors and shapes
        (detectron2's tolerated legacy keys aside: ``pixel_mean`` / ``pixel_std`` may be missing,
        ``anchor_generator.cell_anchors`` may be extra)."""
        try:
            self._check_stage_one(state)  # the stage-two message, naming NUM_CLASSES
        except ValueError as e:
            raise ValueError(f"{self._path}: {self._in_keys(str(e))}") from e
        prefix = "module."
        keys = [k[len(prefix) :] if k.startswith(prefix) else k for k in state]
        model_keys = self.model.state_dict().keys()
        missing = _not_derivable([k for k in model_keys if k not in set(keys)])
        missing = [k for k in missing if k not in _MAY_BE_MISSING]
        unexpected = [k for k in keys if k not in model_keys and _LEGACY not in k]
        self._raise_if([], missing, unexpected)

    def _raise_if(self, shapes, missing, unexpected):
        if not (shapes or missing or unexpected):
            return
        parts = []
        if shapes:
            parts.append(
                f"{len(shapes)} tensor(s) of another shape: "
                + ", ".join(f"{k} (checkpoint {a}, model {b})" for k, a, b in shapes[:SHOW])
            )
        if missing:
            parts.append(f"{len(missing)} tensor(s) of the model missing: {missing[:SHOW]}")
        if unexpected:
            parts.append(
                f"{len(unexpected)} tensor(s) of the checkpoint not in the model: "
                f"{unexpected[:SHOW]}"
            )
        raise ValueError(
            f"{self.keys['weights']}={self._path!r} does not match this model exactly ("
            + "; ".join(parts)
            + "). Inference would run with randomly initialised tensors. Use the config the "
            f"checkpoint was trained with ({self.keys['num_classes']}, the ROI heads, the "
            "DisAlign calibration options), or the checkpoint of this config."
        )


# detectron2's DetectionCheckpointer tolerates these (older checkpoints).
_MAY_BE_MISSING = ("pixel_mean", "pixel_std")


def _not_derivable(missing):
    """``missing`` without the statistics buffers of the training-free test-time methods (NorCal's
    ``class_counts``, FRACAL's ``fracal_freq`` / ``fracal_dims``): a stage-one checkpoint has none,
    and the predictor computes them from ``DATASETS.TRAIN`` at its first inference (logged)."""
    derivable = [k for k in missing if k.split(".")[-1] in DISALIGN_BUFFER_NAMES]
    if derivable:
        logger.info("Not in the checkpoint, computed from the training data: %s", derivable)
    return [k for k in missing if k not in derivable]


_LEGACY = "anchor_generator.cell_anchors"


def _weights_to_load(checkpointer, weights, save_dir, resume):
    if resume and save_dir and checkpointer.has_checkpoint():
        return checkpointer.get_checkpoint_file()
    return weights


def _no_weights(model, keys):
    disalign = [k for k in model.state_dict() if is_disalign_state(k)]
    if disalign:
        raise ValueError(
            f"{keys['weights']} is empty: this DisAlign model would be evaluated with randomly "
            f"initialised weights ({len(disalign)} calibration tensor(s) at their identity "
            f"initialisation on a random network). Set {keys['weights']} to a trained "
            "checkpoint (e.g. output/.../model_final.pth)."
        )


def precheck_inference_weights(
    model, weights: str, *, save_dir: str = "", resume: bool = False, keys: Optional[dict] = None
) -> None:
    """What :func:`load_for_inference` would reject, checked without loading anything into
    ``model`` (which may live on the ``meta`` device): run before a tool writes its output folder.
    Checkpoints that need detectron2's name-matching heuristics (Caffe2 ``.pkl``) are checked only
    when loaded."""
    checkpointer = InferenceCheckpointer(model, save_dir, keys=keys)
    path = _weights_to_load(checkpointer, weights, save_dir, resume)
    if not path:
        _no_weights(model, checkpointer.keys)
        return
    local = path if os.path.isfile(path) else checkpointer.path_manager.get_local_path(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"{checkpointer.keys['weights']}={path!r} does not exist")
    checkpointer.dry_run = True
    checkpointer.load(path, checkpointables=[])


def load_for_inference(
    model,
    weights: str,
    *,
    save_dir: str = "",
    resume: bool = False,
    keys: Optional[dict] = None,
    evaluating: bool = True,
):
    """Load ``weights`` (or, with ``resume``, the checkpoint ``save_dir/last_checkpoint`` names)
    into ``model`` for inference, exactly (:class:`InferenceCheckpointer`).

    No weights at all: a warning that the model is randomly initialised; a ValueError instead
    when ``evaluating`` (``--eval-only``: metrics would be written) a model with DisAlign state
    (calibration or its buffers). Export and visualisation (``evaluating=False``) only warn: a
    random model is a legitimate way to try them.

    Returns:
        the checkpoint dict (empty when nothing was loaded).
    """
    keys = dict(keys or YAML_KEYS)
    checkpointer = InferenceCheckpointer(model, save_dir, keys=keys)
    path = _weights_to_load(checkpointer, weights, save_dir, resume)
    if not path:
        if evaluating:
            _no_weights(model, keys)
        logger.warning(
            "%s is empty: the model is RANDOMLY INITIALISED; its predictions and metrics mean "
            "nothing. Set %s to a trained checkpoint.",
            keys["weights"],
            keys["weights"],
        )
        return {}
    return checkpointer.load(path, checkpointables=[])


class DisAlignPredictor(DefaultPredictor):
    """detectron2's ``DefaultPredictor`` whose ``MODEL.WEIGHTS`` load exactly
    (:func:`load_for_inference`): a checkpoint of another class count or architecture is an
    error, not a silently random head."""

    def __init__(self, cfg):
        weights = cfg.MODEL.WEIGHTS
        empty = cfg.clone()
        empty.defrost()
        empty.MODEL.WEIGHTS = ""  # DefaultPredictor loads nothing; we load strictly below
        super().__init__(empty)
        self.cfg = cfg.clone()
        load_for_inference(self.model, weights, evaluating=False)
