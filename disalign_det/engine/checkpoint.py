"""``DetectionCheckpointer`` with atomic saves, RNG state for exact resumes, clear load errors and
a strict mode for loading a stage-one checkpoint into a frozen stage-two model."""

import logging
import os
import random

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..modeling.freeze import is_calibration_parameter

__all__ = ["DisAlignCheckpointer", "get_rng_state", "set_rng_state"]

logger = logging.getLogger(__name__)


def get_rng_state():
    """Python, numpy and torch RNG states as tensors and plain Python types only (torch >= 2.6
    loads checkpoints with weights_only=True, which rejects numpy objects)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": list(map(_plain, random.getstate())),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }


def _plain(x):
    return list(map(_plain, x)) if isinstance(x, tuple) else x


def _tuple(x):
    return tuple(map(_tuple, x)) if isinstance(x, list) else x


def set_rng_state(state):
    random.setstate(_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])


class DisAlignCheckpointer(DetectionCheckpointer):
    """
    * Saves are atomic: written to a temporary file in the same folder, flushed, then renamed over
      the target (and ``last_checkpoint`` likewise), so a kill during a save never leaves a
      half-written checkpoint behind.
    * Every save stores the RNG states (``rng_state``); :meth:`load` restores them when the
      checkpoint is resumed (``checkpointables`` non-empty), so a resumed run draws the same random
      numbers as an uninterrupted one.
    * A file that cannot be read raises an error naming it.
    * ``strict_stage_one=True`` (DisAlign stage two): every model parameter except the calibration
      must come from the checkpoint with the same shape; otherwise loading fails and says which
      keys and why (typically another MODEL.ROI_HEADS.NUM_CLASSES or another architecture).
    """

    def __init__(self, model, save_dir="", *, strict_stage_one=False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.strict_stage_one = strict_stage_one

    # ---- saving ---------------------------------------------------------------------------
    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data["rng_state"] = get_rng_state()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        _atomic_write(save_file, lambda f: torch.save(data, f), binary=True)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename), binary=False)

    # ---- loading --------------------------------------------------------------------------
    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except Exception as e:  # truncated zip, bad pickle, unexpected EOF, ...
            raise RuntimeError(
                f"Cannot read checkpoint {filename!r}: the file is truncated, corrupt or not a "
                f"checkpoint ({type(e).__name__}: {e}). Check MODEL.WEIGHTS or the "
                "last_checkpoint file in OUTPUT_DIR."
            ) from e

    def _load_model(self, checkpoint):
        if self.strict_stage_one and not checkpoint.get("matching_heuristics", False):
            self._check_stage_one(checkpoint["model"])
        incompatible = super()._load_model(checkpoint)
        if self.strict_stage_one:
            missing = [k for k in incompatible.missing_keys if not is_calibration_parameter(k)]
            if missing:
                raise ValueError(
                    f"The checkpoint lacks {len(missing)} parameter(s) of this model that stage two "
                    f"freezes (e.g. {missing[:5]}): it is not a checkpoint of this architecture. "
                    "Check MODEL.WEIGHTS and the stage-one config (_BASE_)."
                )
        return incompatible

    def _check_stage_one(self, state):
        prefix = "module."
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
        model_state = self.model.state_dict()
        wrong = [
            (k, tuple(v.shape), tuple(model_state[k].shape))
            for k, v in state.items()
            if k in model_state
            and hasattr(v, "shape")
            and tuple(v.shape) != tuple(model_state[k].shape)
        ]
        if wrong:
            lines = "\n".join(f"  {k}: checkpoint {a}, model {b}" for k, a, b in wrong[:10])
            raise ValueError(
                f"The checkpoint does not fit this model ({len(wrong)} shape mismatch(es)):\n{lines}\n"
                "A different class count shows in cls_score/bbox_pred/predictor: set "
                "MODEL.ROI_HEADS.NUM_CLASSES to the stage-one value, or load the right MODEL.WEIGHTS."
            )

    def load(self, path, checkpointables=None):
        checkpoint = super().load(path, checkpointables=checkpointables)
        resuming = checkpointables is None or len(checkpointables) > 0
        if resuming and self.checkpointables and "rng_state" in checkpoint:
            set_rng_state(checkpoint.pop("rng_state"))
        return checkpoint


def _atomic_write(path, write, binary):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb" if binary else "w") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
