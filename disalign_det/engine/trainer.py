"""``Trainer``: detectron2's ``DefaultTrainer`` with DisAlign's freezing, LVIS evaluation, exact
resumes and CPU multi-process support."""

import itertools
import json
import logging
import math
import os
import weakref

import torch
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
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
from ..evaluation import build_lvis_evaluator
from ..modeling import install_class_weights
from ..modeling.freeze import apply_freeze
from .checkpoint import DisAlignCheckpointer, get_rng_state

__all__ = ["Trainer", "ResumableSampler"]

logger = logging.getLogger(__name__)


class ResumableSampler(torch.utils.data.Sampler):
    """Wraps an infinite training sampler (``TrainingSampler``, ``RepeatFactorTrainingSampler``)
    and skips the first ``start`` indices of this process's stream, so that a resumed run sees the
    same images at the same iterations as an uninterrupted one. ``start`` is set by
    :meth:`Trainer.resume_or_load` before the first batch is drawn.

    ``start`` is iterations x images per process: exact when every batch takes the next images
    of the stream, i.e. without aspect-ratio grouping or when all images fall in one group (as in
    the generated datasets). With LVIS's mixed aspect ratios the resumed stream is approximate:
    images waiting in the other group's bucket at the checkpoint are not replayed."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.start = 0

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.start, None)


class _NamedNonFiniteLoss:
    """Raises FloatingPointError naming the iteration and each non-finite loss, on the process
    that computed it and before the optimizer step (so the model is not updated with it).
    detectron2 checks only the sum of the losses averaged over processes, on the main process,
    and prints numpy reprs (``np.float64(nan)``)."""

    def _write_metrics(self, loss_dict, *args, **kwargs):
        values = {k: float(v.detach().float().mean()) for k, v in loss_dict.items()}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            raise FloatingPointError(
                f"Loss became infinite or NaN at iteration={self.iter}: "
                + ", ".join(f"{k}={v}" for k, v in bad.items())
                + f" (all losses: {values}). The optimizer step was skipped and the last "
                "checkpoint is intact; lower SOLVER.BASE_LR, raise SOLVER.WARMUP_ITERS or check "
                "the training data."
            )
        super()._write_metrics(loss_dict, *args, **kwargs)


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
        install_class_weights(model, cfg)  # GRW weights: training only, never at build time
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
    def build_train_loader(cls, cfg):
        """detectron2's train loader with a :class:`ResumableSampler`, a mapper whose errors name
        the image, and a private generator for the DataLoader's base seed (see
        :func:`_use_private_generator`)."""
        from detectron2.data.build import _train_loader_from_config

        kwargs = _train_loader_from_config(cfg)
        kwargs["sampler"] = ResumableSampler(kwargs["sampler"])
        kwargs["mapper"] = NamedErrorMapper(kwargs["mapper"])
        loader = build_detection_train_loader(**kwargs)
        _use_private_generator(loader)
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader with a mapper whose errors name the image."""
        from detectron2.data.build import _test_loader_from_config

        kwargs = _test_loader_from_config(cfg, dataset_name)
        kwargs["mapper"] = NamedErrorMapper(kwargs["mapper"])
        return build_detection_test_loader(**kwargs)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = getattr(MetadataCatalog.get(dataset_name), "evaluator_type", "lvis")
        if evaluator_type == "lvis":
            return build_lvis_evaluator(cfg, dataset_name, output_folder)
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
        """detectron2's hooks, plus (with several processes) :class:`_GatherRNGStates` right
        before the checkpointer, so that each checkpoint holds every rank's RNG state."""
        ret = super().build_hooks()
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
        # detectron2 v0.6's DefaultTrainer checkpoints only the iteration and the hooks (LR
        # scheduler), not the optimizer: a resumed run restarted SGD momentum from zero. Current
        # detectron2 stores the inner trainer's state under "_trainer", as here.
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
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
            per_process = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            sampler = _find_resumable_sampler(self.data_loader)
            if sampler is not None:
                sampler.start = self.start_iter * per_process
            else:
                logger.warning("Resuming without a ResumableSampler: the data order restarts.")


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


def _use_private_generator(loader):
    # Creating a DataLoader iterator draws its workers' base seed from the global torch RNG unless
    # the DataLoader has a generator. That draw happens on the first batch: at iteration 0 in an
    # uninterrupted run but right after the RNG state was restored in a resumed one, so it would
    # shift every later torch draw (proposal sampling) and break exact resumes. The private
    # generator is seeded from the global RNG now, at build time, which an uninterrupted and a
    # resumed run reach in the same state (same SEED and rank: default_setup).
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    for obj in _walk_loader(loader):
        if isinstance(obj, torch.utils.data.DataLoader) and obj.generator is None:
            obj.generator = torch.Generator().manual_seed(seed)


def model_on_cuda(model):
    p = next(model.parameters(), None)
    return p is not None and p.is_cuda


def _find_resumable_sampler(loader):
    return next((o for o in _walk_loader(loader) if isinstance(o, ResumableSampler)), None)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item"):
        return x.item()
    return x
