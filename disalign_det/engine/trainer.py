"""``Trainer``: detectron2's ``DefaultTrainer`` with DisAlign's freezing, LVIS evaluation, exact
resumes and CPU multi-process support."""

import itertools
import json
import logging
import math
import os
import weakref
from collections.abc import Mapping

import torch
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    HookBase,
    SimpleTrainer,
    TrainerBase,
    hooks,
)
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data import check_num_classes
from ..data.samplers import GroupedBatchSampler, build_resumable_train_loader
from ..evaluation import build_lvis_evaluator
from ..evaluation.sem_seg_evaluation import build_sem_seg_evaluator
from ..modeling import install_class_weights
from ..modeling.freeze import apply_freeze
from ..modeling.sem_seg import build_sem_seg_lr_scheduler, install_pixel_class_weights, is_sem_seg
from .checkpoint import DisAlignCheckpointer, get_rng_state
from .progress import TrainProgressHook, track_loader

__all__ = ["Trainer", "ResumableSampler"]

logger = logging.getLogger(__name__)


class ResumableSampler(torch.utils.data.Sampler):
    """Wraps an infinite training sampler and skips the first ``start`` indices of this process's
    stream (set by :meth:`Trainer.resume_or_load` to iterations x images per process).

    For loaders built with detectron2's ``build_detection_train_loader`` (e.g. by a subclass's
    ``build_train_loader``). Exact only without data-loader workers and with images of one
    aspect-ratio group: detectron2 groups after the workers, so images waiting in the other group's
    bucket at the checkpoint are lost. :meth:`Trainer.build_train_loader` uses
    :class:`~disalign_det.data.samplers.GroupedBatchSampler` instead, which is exact."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.start = 0

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.start, None)


class _NamedNonFiniteLoss:
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
        raise FloatingPointError(
            f"Loss became infinite or NaN at iteration={self.iter}: "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + f" (all losses: {values}). The optimizer step was skipped and the last "
            "checkpoint is intact; lower SOLVER.BASE_LR, raise SOLVER.WARMUP_ITERS or check "
            "the training data."
        )


class _SimpleTrainer(_NamedNonFiniteLoss, SimpleTrainer):
    pass


class _AMPTrainer(_NamedNonFiniteLoss, AMPTrainer):
    pass


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` for disalign-det.

    * ``build_model`` applies ``MODEL.DISALIGN.FREEZE`` (stage two trains only the calibration).
    * The checkpointer saves atomically with RNG state; in stage two it loads the stage-one
      checkpoint strictly (only calibration parameters may be missing).
    * ``resume_or_load(resume=True)`` continues the data stream where it stopped.
    * Multi-process training works on CPU (gloo) as well as GPUs (see
      ``disalign_det.engine.launch``).
    * LVIS datasets are evaluated with ``build_lvis_evaluator`` (streaming LVIS evaluation, max
      detections tied to ``TEST.DETECTIONS_PER_IMAGE``); results are also written as JSON.
    """

    def __init__(self, cfg):
        # Mirrors DefaultTrainer.__init__ (v0.6 and current), except for the DDP wrapper (no
        # device_ids on CPU; unused calibration parameters allowed in stage two) and the
        # checkpointer.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        check_num_classes(cfg)  # registers DATASETS.LVIS_FORMAT first
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        # GRW weights: training only, never at build time (pixel counts for a segmentation model)
        (install_pixel_class_weights if is_sem_seg(cfg) else install_class_weights)(model, cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(
            model,
            broadcast_buffers=False,
            device_ids=[comm.get_local_rank()] if model_on_cuda(model) else None,
            # In stage two a branch can have no foreground in a batch: its calibration
            # parameters then get no gradient on that process.
            find_unused_parameters=cfg.MODEL.DISALIGN.FREEZE != "none",
        )
        if cfg.SOLVER.AMP.ENABLED and not model_on_cuda(model):
            # detectron2's AMPTrainer asserts CUDA at the first step, naming no config key.
            raise ValueError(
                "SOLVER.AMP.ENABLED True needs a CUDA device (detectron2's AMPTrainer is "
                f"CUDA-only; MODEL.DEVICE is {cfg.MODEL.DEVICE!r}): set SOLVER.AMP.ENABLED False."
            )
        self._trainer = (_AMPTrainer if cfg.SOLVER.AMP.ENABLED else _SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DisAlignCheckpointer(
            model,
            cfg.OUTPUT_DIR,
            strict_stage_one=cfg.MODEL.DISALIGN.FREEZE != "none",
            trainer=weakref.proxy(self),
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        apply_freeze(model, cfg.MODEL.DISALIGN.FREEZE)
        logger.info("Model:\n%s", model)
        return model

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        # DeepLab's "WarmupPolyLR" (the ADE20K recipes) where asked; detectron2's otherwise.
        return build_sem_seg_lr_scheduler(cfg, optimizer) or super().build_lr_scheduler(
            cfg, optimizer
        )

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's train loader (dataset, mapper, sampler from the config) with exact resumes:
        aspect-ratio grouping by a :class:`~disalign_det.data.samplers.GroupedBatchSampler` in the
        main process and per-image augmentation seeds with workers (see
        :mod:`disalign_det.data.samplers`), a mapper whose errors name the image, and a private
        generator for the DataLoader's base seed (see :func:`_private_generator`)."""
        from detectron2.data.build import _train_loader_from_config

        kwargs = _train_loader_from_config(cfg)
        return build_resumable_train_loader(
            kwargs["dataset"],
            mapper=NamedErrorMapper(kwargs["mapper"]),
            sampler=kwargs["sampler"],
            total_batch_size=kwargs["total_batch_size"],
            aspect_ratio_grouping=kwargs["aspect_ratio_grouping"],
            num_workers=kwargs["num_workers"],
            generator=_private_generator(),
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader with a mapper whose errors name the image."""
        from detectron2.data.build import _test_loader_from_config

        kwargs = _test_loader_from_config(cfg, dataset_name)
        kwargs["mapper"] = NamedErrorMapper(kwargs["mapper"])
        return track_loader(build_detection_test_loader(**kwargs), desc=f"eval:{dataset_name}")

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = getattr(MetadataCatalog.get(dataset_name), "evaluator_type", "lvis")
        if evaluator_type == "lvis":
            return build_lvis_evaluator(cfg, dataset_name, output_folder)
        if evaluator_type == "sem_seg":
            return build_sem_seg_evaluator(cfg, dataset_name, output_folder)
        if evaluator_type == "coco":
            # The default fast COCO evaluation needs the compiled detectron2._C.
            return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)
        raise NotImplementedError(f"No evaluator for {dataset_name} (type {evaluator_type!r})")

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process() and cfg.OUTPUT_DIR:
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
            path = os.path.join(cfg.OUTPUT_DIR, "metrics_final.json")
            with open(path, "w") as f:
                json.dump(_jsonable(results), f, indent=2)
            logger.info("Evaluation results written to %s", path)
        return results

    def train(self):
        """Train; returns the last evaluation results (detectron2 returns them only when
        TEST.EXPECTED_RESULTS is set)."""
        results = super().train()
        return results if results is not None else getattr(self, "_last_eval_results", None)

    def build_hooks(self):
        """detectron2's hooks, plus the progress display (:class:`TrainProgressHook`) and (with
        several processes) :class:`_GatherRNGStates` right before the checkpointer, so that each
        checkpoint holds every rank's RNG state."""
        ret = super().build_hooks()
        # Right after the IterationTimer: the bar is drawn before the evaluation hooks run.
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
            ret.insert(at, _GatherRNGStates(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD))
        return ret

    def state_dict(self):
        # The iteration and hook states (LR scheduler) of TrainerBase, plus the inner trainer's
        # state (optimizer, AMP grad scaler) under "_trainer": what detectron2 main's
        # DefaultTrainer stores; v0.6's stored no optimizer (a resumed run restarted SGD momentum
        # from zero). TrainerBase is called directly, the same code on both versions
        # (compat.features.default_trainer_has_state_dict).
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
        super().resume_or_load(resume=resume)
        if self.start_iter > 0:
            batch_sampler = _find_loader_part(self.data_loader, GroupedBatchSampler)
            sampler = _find_loader_part(self.data_loader, ResumableSampler)
            if batch_sampler is not None:
                # Batch i feeds iteration i on every rank.
                batch_sampler.start = self.start_iter
            elif sampler is not None:
                per_process = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
                sampler.start = self.start_iter * per_process
            else:
                logger.warning(
                    "Resuming without a GroupedBatchSampler or ResumableSampler: the data order "
                    "restarts."
                )


class _GatherRNGStates(HookBase):
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


def _walk_loader(loader):
    """Yield ``loader`` and every object reachable through its ``sampler`` / ``dataset`` /
    ``batch_sampler`` attributes: the wrappers of detectron2's train loader differ between
    versions (``AspectRatioGroupedDataset(DataLoader(ToIterableDataset(...)))`` or a bare
    ``DataLoader``)."""
    seen = set()
    stack = [loader]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        for attr in ("sampler", "dataset", "batch_sampler"):
            child = getattr(obj, attr, None)
            if child is not None:
                stack.append(child)


def _private_generator():
    # Creating a DataLoader iterator draws its workers' base seed from the global torch RNG unless
    # the DataLoader has a generator. That draw happens on the first batch: at iteration 0 in an
    # uninterrupted run but right after the RNG state was restored in a resumed one, so it would
    # shift every later torch draw (proposal sampling) and break exact resumes. The private
    # generator is seeded from the global RNG now, at build time, which an uninterrupted and a
    # resumed run reach in the same state (same SEED and rank: default_setup).
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return torch.Generator().manual_seed(seed)


def model_on_cuda(model):
    p = next(model.parameters(), None)
    return p is not None and p.is_cuda


def _find_loader_part(loader, cls):
    return next((o for o in _walk_loader(loader) if isinstance(o, cls)), None)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item"):
        return x.item()
    return x
