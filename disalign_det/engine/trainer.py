"""``Trainer``: detectron2's ``DefaultTrainer`` with DisAlign's freezing, LVIS evaluation, exact
resumes and CPU multi-process support."""

import itertools
import json
import logging
import os
import weakref

import torch
from detectron2.data import MetadataCatalog, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data import check_num_classes, register_datasets_from_cfg
from ..evaluation import build_lvis_evaluator
from ..modeling.freeze import apply_freeze
from .checkpoint import DisAlignCheckpointer

__all__ = ["Trainer", "ResumableSampler"]

logger = logging.getLogger(__name__)


class ResumableSampler(torch.utils.data.Sampler):
    """Wraps an infinite training sampler (``TrainingSampler``, ``RepeatFactorTrainingSampler``)
    and skips the first ``start`` indices of this process's stream, so that a resumed run sees the
    same images at the same iterations as an uninterrupted one. ``start`` is set by
    :meth:`Trainer.resume_or_load` before the first batch is drawn."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.start = 0

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.start, None)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` for disalign-det.

    * ``build_model`` applies ``MODEL.DISALIGN.FREEZE`` (stage two trains only the calibration).
    * The checkpointer saves atomically with RNG state; in stage two it loads the stage-one
      checkpoint strictly (only calibration parameters may be missing).
    * ``resume_or_load(resume=True)`` continues the data stream where it stopped.
    * Multi-process training works on CPU (gloo) as well as GPUs (see ``disalign_det.engine.launch``).
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
        register_datasets_from_cfg(cfg)
        check_num_classes(cfg)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
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
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
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
        from detectron2.data.build import _train_loader_from_config

        kwargs = _train_loader_from_config(cfg)
        kwargs["sampler"] = ResumableSampler(kwargs["sampler"])
        return build_detection_train_loader(**kwargs)

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

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if self.start_iter > 0:
            per_process = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            sampler = _find_resumable_sampler(self.data_loader)
            if sampler is not None:
                sampler.start = self.start_iter * per_process
            else:
                logger.warning("Resuming without a ResumableSampler: the data order restarts.")


def model_on_cuda(model):
    p = next(model.parameters(), None)
    return p is not None and p.is_cuda


def _find_resumable_sampler(loader):
    # AspectRatioGroupedDataset(dataset=DataLoader(sampler=...)) or a DataLoader (current d2).
    seen = set()
    stack = [loader]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, ResumableSampler):
            return obj
        for attr in ("sampler", "dataset", "batch_sampler"):
            child = getattr(obj, attr, None)
            if child is not None:
                stack.append(child)
    return None


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item"):
        return x.item()
    return x
