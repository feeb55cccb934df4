"""The training loop shared by the YAML (:class:`~disalign_det.engine.Trainer`) and the LazyConfig
(:class:`~disalign_det.lazy.train.LazyTrainer`) entry points.

Both build their parts from their own config format and then run the same pieces:

* :func:`build_train_loop`: the inner trainer (detectron2's ``SimpleTrainer`` / ``AMPTrainer``
  with :class:`NonFiniteLossCheck`), in fp32 or under ``torch.autocast`` (:func:`amp_precision`).
* :func:`freeze_model`: stage-two freezing (``apply_freeze``: everything but the calibration, frozen
  norms in eval mode) plus every dropout / drop-path layer without a trainable parameter after it
  kept in eval mode.
* ``disalign_det.data.samplers.build_resumable_train_loader``: the data stream, exact on resume
  with workers and mixed aspect ratios; :meth:`ResumableLoopMixin.resume_or_load` starts it at the
  resumed iteration.
* :class:`ResumableLoopMixin`: trainer state (iteration, hooks, optimizer, grad scaler), resume,
  and the hooks both paths add (progress, gathered RNG states of every rank).
* :func:`write_final_metrics`: ``<output_dir>/metrics_final.json``.

Nothing here knows about LVIS: class weights and evaluators are chosen by each entry point from
the model's own hooks and the dataset's ``evaluator_type``.

Longer than 450 lines: it is the one loop both entry points share, and its pieces (inner trainer,
autocast, freezing, resumable state and hooks) together make the exact-resume guarantee; split,
that guarantee would be spread over several files.
"""

import itertools
import json
import logging
import math
import os
import weakref
from collections.abc import Mapping

import torch
from detectron2.engine import AMPTrainer, HookBase, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils import comm
from torch import nn

from ..compat.features import accepts_kwarg
from ..data.samplers import GroupedBatchSampler
from ..modeling.freeze import apply_freeze
from .checkpoint import get_rng_state
from .progress import TrainProgressHook

__all__ = [
    "AMP_PRECISIONS",
    "AMPTrainLoop",
    "GatherRNGStates",
    "NamedErrorMapper",
    "NonFiniteLossCheck",
    "ResumableLoopMixin",
    "ResumableSampler",
    "SimpleTrainLoop",
    "amp_precision",
    "build_ddp_model",
    "build_train_loop",
    "find_loader_part",
    "freeze_model",
    "jsonable",
    "model_on_cuda",
    "private_generator",
    "walk_loader",
    "write_final_metrics",
]

logger = logging.getLogger(__name__)

#: Values of ``SOLVER.AMP.PRECISION`` / ``train.amp.precision``. "auto": float16 on CUDA
#: (detectron2's AMPTrainer default), bfloat16 on CPU (CPU autocast's native type).
AMP_PRECISIONS = ("auto", "float16", "bfloat16")


class ResumableSampler(torch.utils.data.Sampler):
    """Wraps an infinite training sampler and skips the first ``start`` indices of this process's
    stream (set by :meth:`ResumableLoopMixin.resume_or_load` to iterations x images per process).

    For loaders built with detectron2's ``build_detection_train_loader`` (e.g. by a subclass's
    ``build_train_loader``). Exact only without data-loader workers and with images of one
    aspect-ratio group: detectron2 groups after the workers, so images waiting in the other group's
    bucket at the checkpoint are lost. Both entry points use
    :class:`~disalign_det.data.samplers.GroupedBatchSampler` instead, which is exact."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.start = 0

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.start, None)


class NonFiniteLossCheck:
    """Raises FloatingPointError naming the iteration and each non-finite loss, on the process
    that computed it, in the main thread, right after the forward pass: before the backward pass
    and the optimizer step, so the model and its checkpoints are never updated with it.

    detectron2 checks only the sum of the losses averaged over processes, on the main process,
    and prints numpy reprs (``np.float64(nan)``). Its check is in ``_write_metrics``, which
    detectron2 main can run in a worker thread (``async_write_metrics=True``): there the error
    was lost in a future and the step applied. So the check is a forward hook on the trained model
    (``run_step`` calls it in the main thread on v0.6 and main alike); it only looks at the
    loss dicts of training-mode forwards."""

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        self_ref = weakref.ref(self)

        def check(module, inputs, output):
            trainer = self_ref()
            if trainer is not None and module.training and isinstance(output, Mapping):
                trainer._check_losses(output)

        self._loss_check_handle = model.register_forward_hook(check)

    def _check_losses(self, loss_dict):
        tensors = [v for v in loss_dict.values() if isinstance(v, torch.Tensor)]
        if not tensors:
            return
        # One synchronisation for all losses; the per-loss values only on failure.
        if bool(torch.stack([v.detach().float().mean() for v in tensors]).isfinite().all()):
            return
        values = {
            k: float(v.detach().float().mean())
            for k, v in loss_dict.items()
            if isinstance(v, torch.Tensor)
        }
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if self.iter == self.start_iter:  # TrainerBase sets both (v0.6 and main)
            # No step of this run has been taken: the learning rate cannot be the cause.
            advice = (
                "it is the run's first iteration: the weights it loaded (MODEL.WEIGHTS / "
                "train.init_checkpoint, or the resumed checkpoint) already give non-finite "
                "outputs, or the training data does."
            )
        else:
            advice = (
                "lower the learning rate (SOLVER.BASE_LR / optimizer.lr), lengthen the warmup "
                "(SOLVER.WARMUP_ITERS / lr_multiplier.warmup_length) or check the training data."
            )
        raise FloatingPointError(
            f"Loss became infinite or NaN at iteration={self.iter}: "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + f" (all losses: {values}). The optimizer step was skipped and the last "
            "checkpoint is intact; " + advice
        )


class _AutocastForward:
    """Runs the trained model's forward (and only it: not the backward pass, not the optimizer
    step) under ``torch.autocast(device_type, dtype)``, entered by a forward pre-hook and left by a
    forward hook. ``SimpleTrainer.run_step`` (v0.6 and main alike) is kept as it is; detectron2's
    ``AMPTrainer`` is CUDA-only and v0.6's has no dtype."""

    def __init__(self, model, device_type, dtype):
        self.device_type, self.dtype = device_type, dtype
        self._active = []
        self._handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit),
        ]

    def _enter(self, module, inputs):
        if module.training:
            ctx = torch.autocast(self.device_type, dtype=self.dtype)
            ctx.__enter__()
            self._active.append(ctx)

    def _exit(self, module, inputs, output):
        if module.training and self._active:
            self._active.pop().__exit__(None, None, None)

    def leave(self):
        """Leave an autocast region a failed forward did not leave (its forward hook never ran)."""
        while self._active:
            self._active.pop().__exit__(None, None, None)


class SimpleTrainLoop(NonFiniteLossCheck, SimpleTrainer):
    """detectron2's ``SimpleTrainer`` with :class:`NonFiniteLossCheck`; with ``precision`` (a
    torch dtype) the forward pass runs under ``torch.autocast`` for the model's device type, the
    backward pass and the optimizer step in the parameters' own dtype (no gradient scaler: what
    bfloat16 needs, having float32's exponent range)."""

    def __init__(self, model, data_loader, optimizer, *, precision=None, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.precision = precision
        self._autocast = None
        if precision is not None:
            self._autocast = _AutocastForward(model, _device_type(model), precision)

    def run_step(self):
        try:
            super().run_step()
        finally:
            if self._autocast is not None:
                self._autocast.leave()


class AMPTrainLoop(NonFiniteLossCheck, AMPTrainer):
    """detectron2's ``AMPTrainer`` (float16 autocast on CUDA with its ``GradScaler``, whose state
    is saved with the trainer for exact resumes) with :class:`NonFiniteLossCheck`."""

    def load_state_dict(self, state_dict):
        if "grad_scaler" in state_dict:
            return super().load_state_dict(state_dict)
        # A checkpoint written without float16 AMP (fp32 or bfloat16): detectron2's AMPTrainer
        # would raise KeyError. The scaler starts from its initial scale, as in a new run.
        logger.warning(
            "The checkpoint has no grad scaler state (saved without float16 AMP): the scaler "
            "starts from its initial scale."
        )
        SimpleTrainer.load_state_dict(self, state_dict)


def _device_type(model):
    p = next(model.parameters(), None)
    return p.device.type if p is not None else "cpu"


def model_on_cuda(model):
    """True if the first parameter of ``model`` is on a CUDA device."""
    return _device_type(model) == "cuda"


def amp_precision(enabled, precision, model, *, key):
    """The autocast dtype of a training run, or None for float32.

    Args:
        enabled (bool): ``SOLVER.AMP.ENABLED`` / ``train.amp.enabled``.
        precision (str): one of :data:`AMP_PRECISIONS`.
        model: the model to train (its device decides "auto" and what is allowed).
        key (str): the precision's config key, for the error messages (e.g. "SOLVER.AMP").

    float16 on CPU is refused: float16's range needs a gradient scaler, and detectron2's
    ``AMPTrainer`` that holds one asserts CUDA.
    """
    if not enabled:
        return None
    # The sub-keys in the case of the config's: SOLVER.AMP.PRECISION, train.amp.precision.
    on, dtype = (
        (f"{key}.enabled", f"{key}.precision")
        if key.islower()
        else (
            f"{key}.ENABLED",
            f"{key}.PRECISION",
        )
    )
    if precision not in AMP_PRECISIONS:
        raise ValueError(f"{dtype} must be one of {AMP_PRECISIONS}, got {precision!r}")
    device = _device_type(model)
    if device not in ("cpu", "cuda"):
        raise ValueError(
            f"{on} True: mixed precision is supported on cpu and cuda, the model is on "
            f"{device!r}; set {on} False."
        )
    if precision == "auto":
        precision = "float16" if device == "cuda" else "bfloat16"
    if precision == "float16" and device != "cuda":
        raise ValueError(
            f"{dtype} 'float16' needs a CUDA device (float16 training needs a gradient "
            "scaler, which detectron2's AMPTrainer keeps on CUDA only); on CPU set "
            f"{dtype} 'bfloat16' (or {on} False)."
        )
    return getattr(torch, precision)


def build_train_loop(model, data_loader, optimizer, precision=None):
    """The inner trainer of both entry points: :class:`AMPTrainLoop` for float16 (CUDA),
    :class:`SimpleTrainLoop` otherwise (float32, or bfloat16 autocast without a scaler).

    Args:
        precision: None (float32) or the dtype from :func:`amp_precision`.
    """
    if precision == torch.float16:
        # detectron2 main's AMPTrainer takes the autocast dtype; v0.6's always uses float16.
        kwargs = {"precision": precision} if accepts_kwarg(AMPTrainer, "precision") else {}
        return AMPTrainLoop(model, data_loader, optimizer, **kwargs)
    return SimpleTrainLoop(model, data_loader, optimizer, precision=precision)


def build_ddp_model(model, *, train_calibration_only, **ddp):
    """``create_ddp_model`` for both devices: no ``device_ids`` and no fp16 gradient compression
    on CPU (gloo's all-reduce gains nothing from it), and unused parameters allowed in stage two
    (a branch can see no foreground in a batch: its calibration gets no gradient there)."""
    if train_calibration_only:
        ddp["find_unused_parameters"] = True
    if model_on_cuda(model):
        ddp.setdefault("device_ids", [comm.get_local_rank()])
    else:
        ddp["device_ids"] = None
        ddp["fp16_compression"] = False
    return create_ddp_model(model, **ddp)


def _is_stochastic(module):
    # Dropout and stochastic depth (timm's DropPath in ViT, MViTv2, Swin).
    return isinstance(module, nn.modules.dropout._DropoutNd) or type(module).__name__ == "DropPath"


def _keep_eval(module, inputs):
    module.training = False


def freeze_model(model, mode="all_but_calibration"):
    """Freeze ``model`` in place for stage two, the same on both entry points: ``apply_freeze``
    (everything but the calibration trains no more; frozen norms in eval mode), and every dropout /
    drop-path layer without a trainable parameter after it kept in eval mode: a frozen ViT would
    otherwise feed the calibration with randomly dropped residual branches (ViTDet trains with
    drop_path_rate 0.1-0.5), features it never sees at inference.

    Args:
        mode: ``MODEL.DISALIGN.FREEZE`` / ``disalign.freeze``; "none" changes nothing.

    Returns:
        ``model``.
    """
    apply_freeze(model, mode)
    if mode == "none":
        return model
    for module in model.modules():
        if _is_stochastic(module) and not any(p.requires_grad for p in module.parameters()):
            module.eval()
            module.register_forward_pre_hook(_keep_eval)
    return model


class GatherRNGStates(HookBase):
    """At each iteration the checkpointer saves at, gathers the RNG states of all ranks into
    ``checkpointer.rank_rng_states`` (only the main process saves, and each rank draws its own
    random numbers: flips, RoI sampling)."""

    def __init__(self, checkpointer, period):
        self.checkpointer = checkpointer
        self.period = period

    def after_step(self):
        it = self.trainer.iter
        # The condition of detectron2's PeriodicCheckpointer (periodic and final saves).
        if (it + 1) % self.period == 0 or it >= self.trainer.max_iter - 1:
            self.checkpointer.rank_rng_states = (it, comm.all_gather(get_rng_state()))


class NamedErrorMapper:
    """Calls a dataset mapper and re-raises any error with the image's path and id: PIL and
    OpenCV often say only "Truncated File Read" or "cannot identify image file", and a data loader
    worker's traceback does not show which dataset dict it was mapping."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, dataset_dict):
        try:
            return self.mapper(dataset_dict)
        except Exception as e:
            raise RuntimeError(
                f"Cannot load image {dataset_dict.get('file_name')!r} (image_id="
                f"{dataset_dict.get('image_id')!r}): {type(e).__name__}: {e}. Re-download or "
                "remove the file, or drop the image from the dataset json."
            ) from e


def walk_loader(loader):
    """Yield ``loader`` and every object reachable through its ``sampler`` / ``dataset`` /
    ``batch_sampler`` / ``loader`` attributes: the wrappers of train loaders differ between
    versions (``AspectRatioGroupedDataset(DataLoader(ToIterableDataset(...)))``, a bare
    ``DataLoader``, a ``ResumableTrainLoader``)."""
    seen = set()
    stack = [loader]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        for attr in ("sampler", "dataset", "batch_sampler", "loader"):
            child = getattr(obj, attr, None)
            if child is not None:
                stack.append(child)


def find_loader_part(loader, cls):
    """The first object of class ``cls`` in :func:`walk_loader`, or None."""
    return next((o for o in walk_loader(loader) if isinstance(o, cls)), None)


def private_generator():
    """A ``torch.Generator`` for a DataLoader's worker base seed, seeded from the global RNG now.

    Creating a DataLoader iterator draws its workers' base seed from the global torch RNG unless
    the DataLoader has a generator. That draw happens on the first batch: at iteration 0 in an
    uninterrupted run but right after the RNG state was restored in a resumed one, so it would
    shift every later torch draw (proposal sampling) and break exact resumes. Seeded at build
    time, which an uninterrupted and a resumed run reach in the same state (same seed and rank)."""
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return torch.Generator().manual_seed(seed)


def jsonable(x):
    """``x`` with tensors / numpy scalars replaced by Python numbers (for ``json.dump``)."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item"):
        return x.item()
    return x


def write_final_metrics(results, output_dir):
    """Write ``results`` to ``<output_dir>/metrics_final.json`` on the main process (nothing when
    ``output_dir`` is empty); returns the path or None."""
    if not comm.is_main_process() or not output_dir:
        return None
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "metrics_final.json")
    with open(path, "w") as f:
        json.dump(jsonable(results), f, indent=2)
    logger.info("Evaluation results written to %s", path)
    return path


class ResumableLoopMixin:
    """What the YAML and the LazyConfig trainers share, on top of detectron2's ``TrainerBase``
    (``DefaultTrainer`` for YAML). The subclass sets ``self._trainer`` (from
    :func:`build_train_loop`), ``self.checkpointer``, ``self.max_iter``, ``self.start_iter`` and
    implements :meth:`weights` (the checkpoint to start from) and :meth:`images_per_process`.

    * ``state_dict``: iteration and hook states (LR scheduler) plus the inner trainer's state
      (optimizer, float16 grad scaler) under ``"_trainer"``.
    * :meth:`resume_or_load`: loads, and starts the data stream at the resumed iteration.
    * :meth:`add_loop_hooks`: the progress display and (several processes) the RNG-state gathering
      right before the checkpointer.
    """

    def weights(self):
        raise NotImplementedError

    def images_per_process(self):
        raise NotImplementedError

    def seed_key(self):
        """(name, value) of the config's seed key (``SEED`` / ``train.seed``)."""
        raise NotImplementedError

    def run_step(self):
        # start_iter too: the inner loop's non-finite-loss check tells a run's first iteration
        # (a resumed one's included) from the later ones.
        self._trainer.iter, self._trainer.start_iter = self.iter, self.start_iter
        self._trainer.run_step()

    def state_dict(self):
        # TrainerBase is called directly: the same code on both detectron2 versions (v0.6's
        # DefaultTrainer stored no optimizer: a resumed run restarted SGD momentum from zero).
        ret = TrainerBase.state_dict(self)
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        # Not super(): main's DefaultTrainer.load_state_dict requires "_trainer" (KeyError on a
        # checkpoint written by v0.6's DefaultTrainer); v0.6's ignores it.
        TrainerBase.load_state_dict(self, state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning(
                "The checkpoint has no optimizer state (written by detectron2 v0.6's "
                "DefaultTrainer?): the optimizer restarts from its initial state."
            )

    def resume_or_load(self, resume=True):
        """Load :meth:`weights` (or, with ``resume``, the last checkpoint of the output folder and
        the trainer state); a resumed run continues the data stream at its iteration."""
        self.checkpointer.resume_or_load(self.weights(), resume=resume)
        self.start_iter = self.iter + 1 if resume and self.checkpointer.has_checkpoint() else 0
        if self.start_iter > 0:
            self._start_data_at(self.start_iter)
            key, seed = self.seed_key()
            if seed is None or seed < 0:
                # The sampler's seed (the data order) and the workers' seeds derive from it.
                logger.warning(
                    "Resuming with %s=%s (a random seed per run): the data order differs from "
                    "the interrupted run's; set %s to a fixed value for exact resumes.",
                    key,
                    seed,
                    key,
                )

    def _start_data_at(self, iteration):
        batch_sampler = find_loader_part(self._trainer.data_loader, GroupedBatchSampler)
        sampler = find_loader_part(self._trainer.data_loader, ResumableSampler)
        if batch_sampler is not None:
            # Batch i feeds iteration i on every rank.
            batch_sampler.start = iteration
        elif sampler is not None:
            sampler.start = iteration * self.images_per_process()
        else:
            logger.warning(
                "Resuming without a GroupedBatchSampler or ResumableSampler: the data order "
                "restarts."
            )

    def add_loop_hooks(self, ret, period):
        """Insert the shared hooks into the hook list ``ret`` (in place, returned): the progress
        display right after the IterationTimer (the bar is drawn before the evaluation hooks run)
        and, with several processes, :class:`GatherRNGStates` right before the checkpointer
        (``period`` its period), so that each checkpoint holds every rank's RNG state."""
        ret.insert(
            1 if ret and isinstance(ret[0], hooks.IterationTimer) else 0,
            TrainProgressHook(self.max_iter),
        )
        if comm.get_world_size() > 1:
            # The checkpointer exists on the main process only, followed by the EvalHook on all:
            # the same position in the hook order on every rank.
            at = next(
                (
                    i
                    for i, h in enumerate(ret)
                    if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))
                ),
                len(ret),
            )
            ret.insert(at, GatherRNGStates(self.checkpointer, period))
        return ret
