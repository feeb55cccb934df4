"""``DetectionCheckpointer`` with atomic saves, RNG state for exact resumes, clear load errors and
a strict mode for loading a stage-one checkpoint into a frozen stage-two model."""

import logging
import os
import random

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..modeling.freeze import is_calibration_parameter, is_disalign_state

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
        # On a GPU the RoI sampling (detectron2's subsample_labels: randperm on the labels'
        # device) and the federated loss's negatives draw from the CUDA generators.
        **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_initialized() else {}),
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
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class DisAlignCheckpointer(DetectionCheckpointer):
    """
    * Saves go through the checkpointer's ``path_manager`` (iopath), like detectron2's, so an
      ``OUTPUT_DIR`` on a registered remote backend works. Where the backend is the local disk they
      are atomic: written to a temporary file in the same folder, flushed, then renamed over the
      target (and ``last_checkpoint`` likewise), so a kill during a save never leaves a
      half-written checkpoint behind. Other backends get what their ``open(path, "wb")`` gives.
    * Every save stores the RNG states (``rng_state``); :meth:`load` restores them when the
      checkpoint is resumed (``checkpointables`` non-empty), so a resumed run draws the same random
      numbers as an uninterrupted one. Only the main process saves: in multi-process training the
      trainer gathers every rank's states into :attr:`rank_rng_states` first (``rng_states``,
      one per rank), and each rank restores its own.
    * A file that cannot be read raises an error naming it.
    * ``strict_stage_one=True`` (DisAlign stage two): every model parameter except the calibration
      must come from the checkpoint with the same shape; otherwise loading fails and says which
      keys and why (typically another MODEL.ROI_HEADS.NUM_CLASSES or another architecture).
    """

    def __init__(self, model, save_dir="", *, strict_stage_one=False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.strict_stage_one = strict_stage_one
        # (iteration, [RNG state of rank 0, rank 1, ...]) gathered by the trainer for the save of
        # that iteration.
        self.rank_rng_states = None

    # ---- saving ---------------------------------------------------------------------------
    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data["rng_state"] = get_rng_state()
        if self.rank_rng_states is not None and self.rank_rng_states[0] == kwargs.get("iteration"):
            data["rng_states"] = self.rank_rng_states[1]
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        self._write(save_file, lambda f: torch.save(data, f), binary=True)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        path = os.path.join(self.save_dir, "last_checkpoint")
        self._write(path, lambda f: f.write(last_filename_basename), binary=False)

    def _write(self, path, write, binary):
        local = _local_path(self.path_manager, path)
        if local is not None:
            _atomic_write(local, write, binary)
        else:
            with self.path_manager.open(path, "wb" if binary else "w") as f:
                write(f)

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
        if not checkpoint.get("matching_heuristics", False):
            # A DisAlign checkpoint (it has calibration) must fit the config exactly, too.
            calibrated = [k for k in checkpoint["model"] if is_calibration_parameter(k)]
            if self.strict_stage_one or calibrated:
                self._check_stage_one(checkpoint["model"])
            _check_calibration_fits(calibrated, self.model.state_dict())
        incompatible = super()._load_model(checkpoint)
        if self.strict_stage_one:
            missing = [k for k in incompatible.missing_keys if not is_disalign_state(k)]
            if missing:
                raise ValueError(
                    f"The checkpoint lacks {len(missing)} parameter(s) of this model that stage "
                    f"two freezes (e.g. {missing[:5]}): it is not a checkpoint of this "
                    "architecture. Check MODEL.WEIGHTS and the stage-one config (_BASE_)."
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
                f"The checkpoint does not fit this model ({len(wrong)} shape mismatch(es)):\n"
                f"{lines}\nA different class count shows in cls_score/bbox_pred/predictor: set "
                "MODEL.ROI_HEADS.NUM_CLASSES to the stage-one value, or load the right "
                "MODEL.WEIGHTS."
            )

    def load(self, path, checkpointables=None):
        checkpoint = super().load(path, checkpointables=checkpointables)
        resuming = checkpointables is None or len(checkpointables) > 0
        states, state = checkpoint.pop("rng_states", None), checkpoint.pop("rng_state", None)
        if resuming and self.checkpointables and state is not None:
            rank, world_size = comm.get_rank(), comm.get_world_size()
            if states is not None and len(states) == world_size:
                set_rng_state(states[rank])
            else:
                set_rng_state(state)
                if world_size > 1:
                    # Another process count than the run that saved: the resumed run cannot be
                    # exact, but the ranks must not share one random stream (the same flips on
                    # every process). Each derives its own seed from the saved state and its rank.
                    logger.warning(
                        "%s holds the RNG states of %s process(es), this run has %d: resuming "
                        "with per-rank seeds derived from them (not bit-identical to an "
                        "uninterrupted run).",
                        path,
                        len(states) if states is not None else 1,
                        world_size,
                    )
                    if rank > 0:
                        seed_all_rng(int(torch.randint(0, 2**31 - 1, ())) + rank)
        return checkpoint


def _check_calibration_fits(calibrated, model_state):
    """ValueError if checkpoint keys ``calibrated`` (its calibration) are not in ``model_state``:
    a DisAlign checkpoint loaded into a config without (some of) its calibration."""

    def strip(k):
        return k[len("module.") :] if k.startswith("module.") else k

    keys = {strip(k) for k in model_state}
    extra = [k for k in calibrated if strip(k) not in keys]
    if extra:
        raise ValueError(
            f"The checkpoint is a DisAlign checkpoint with {len(extra)} calibration tensor(s) this "
            f"model lacks (e.g. {extra[:4]}): its config has no such calibration. Use the config "
            "it was trained with (MODEL.ROI_HEADS.NAME DisAlignROIHeads, MODEL.ROI_MASK_HEAD.NAME "
            "DisAlignMaskRCNNConvUpsampleHead, MODEL.DISALIGN.BOX_CALIBRATION / "
            "MASK_CALIBRATION True)."
        )


def _local_path(path_manager, path):
    """The local file system path of ``path`` if ``path_manager`` resolves it to the local disk
    (iopath's ``NativePathHandler``: plain paths and ``file://``), else None (remote backends)."""
    from iopath.common.file_io import NativePathHandler

    try:
        # iopath's handler lookup is private (name-mangled); without it, only plain paths count.
        handler = path_manager._PathManager__get_path_handler(path)
    except AttributeError:
        handler = None if "://" in path else NativePathHandler()
    if not isinstance(handler, NativePathHandler):
        return None
    return path[len("file://") :] if path.startswith("file://") else path


def _atomic_write(path, write, binary):
    """Write ``path`` via ``write(f)`` to a temporary file in the same folder, then rename it over
    ``path``: readers see the old file or the complete new one, never a partial one. A failed write
    removes the temporary file and leaves ``path`` as it was."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    # Persist the rename itself, so that a power loss cannot bring back the old directory entry.
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:  # e.g. a file system that does not open folders: the rename is done anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
