"""Loading weights for inference (``--eval-only``, export, visualisation, ``DisAlignPredictor``)
with the strictness of DisAlign stage two.

detectron2 loads any checkpoint for inference: tensors of another shape or name are skipped with a
"Skip loading parameter" warning and the model evaluates randomly initialised heads (with exit
status 0 and a ``metrics_final.json``). Here anything but an exact match of the model is an error
that names the mismatched tensors and the config key to change, and a model with no weights at
all is a loud warning, or an error for a DisAlign model (its calibration would be evaluated at its
identity initialisation on top of a random network).
"""

import logging
from typing import Optional

from detectron2.engine import DefaultPredictor

from ..modeling.freeze import is_disalign_state
from .checkpoint import DisAlignCheckpointer

__all__ = ["DisAlignPredictor", "InferenceCheckpointer", "load_for_inference"]

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

    def load(self, path, checkpointables=None):
        self._path = path
        return super().load(path, checkpointables=checkpointables)

    def _in_keys(self, message: str) -> str:
        # The stage-two messages name the YAML keys.
        for k, yaml_key in YAML_KEYS.items():
            message = message.replace(yaml_key, self.keys[k])
        return message

    def _load_model(self, checkpoint):
        if not checkpoint.get("matching_heuristics", False):
            try:
                self._check_stage_one(checkpoint["model"])
            except ValueError as e:
                raise ValueError(f"{self._path}: {self._in_keys(str(e))}") from e
        incompatible = super()._load_model(checkpoint)
        shapes = list(getattr(incompatible, "incorrect_shapes", ()) or ())
        missing, unexpected = list(incompatible.missing_keys), list(incompatible.unexpected_keys)
        if shapes or missing or unexpected:
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
        return incompatible


def load_for_inference(
    model,
    weights: str,
    *,
    save_dir: str = "",
    resume: bool = False,
    keys: Optional[dict] = None,
):
    """Load ``weights`` (or, with ``resume``, the checkpoint ``save_dir/last_checkpoint`` names)
    into ``model`` for inference, exactly (:class:`InferenceCheckpointer`).

    No weights at all: ValueError for a model with DisAlign state (calibration or its buffers),
    else a warning that the model is randomly initialised.

    Returns:
        the checkpoint dict (empty when nothing was loaded).
    """
    keys = dict(keys or YAML_KEYS)
    checkpointer = InferenceCheckpointer(model, save_dir, keys=keys)
    if resume and save_dir and checkpointer.has_checkpoint():
        return checkpointer.load(checkpointer.get_checkpoint_file(), checkpointables=[])
    if not weights:
        disalign = [k for k in model.state_dict() if is_disalign_state(k)]
        if disalign:
            raise ValueError(
                f"{keys['weights']} is empty: this DisAlign model would be evaluated with randomly "
                f"initialised weights ({len(disalign)} calibration tensor(s) at their identity "
                f"initialisation on a random network). Set {keys['weights']} to a trained "
                "checkpoint (e.g. output/.../model_final.pth)."
            )
        logger.warning(
            "%s is empty: the model is RANDOMLY INITIALISED; its predictions and metrics mean "
            "nothing. Set %s to a trained checkpoint.",
            keys["weights"],
            keys["weights"],
        )
        return {}
    return checkpointer.load(weights, checkpointables=[])


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
        load_for_inference(self.model, weights)
