"""``Trainer``: detectron2's ``DefaultTrainer`` with DisAlign's freezing, LVIS evaluation, exact
resumes, mixed precision and CPU multi-process support; the loop is the one of
:mod:`disalign_det.engine.loop`, shared with the LazyConfig entry point."""

import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultTrainer, TrainerBase
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.modeling import build_model
from detectron2.solver import build as solver_build
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data import check_num_classes
from ..data.lvis_format import register_datasets_from_cfg
from ..data.samplers import build_resumable_train_loader
from ..evaluation import DEFAULT_MAX_DETS_PER_IMAGE, build_lvis_evaluator
from ..evaluation.fixed_ap import FixedAPPruner, pruning_before_masks
from ..evaluation.sem_seg_evaluation import build_sem_seg_evaluator
from ..modeling import install_class_weights
from ..modeling.sem_seg import build_sem_seg_lr_scheduler
from .checkpoint import DisAlignCheckpointer
from .loop import (
    NamedErrorMapper,
    ResumableLoopMixin,
    amp_precision,
    build_ddp_model,
    build_train_loop,
    freeze_model,
    private_generator,
    write_final_metrics,
)
from .progress import track_loader

__all__ = ["Trainer", "EVALUATORS", "clip_full_model_gradients"]

logger = logging.getLogger(__name__)


def _coco_evaluator(cfg, dataset_name, output_folder):
    # The default fast COCO evaluation needs the compiled detectron2._C.
    return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)


#: ``evaluator_type`` of a dataset's metadata -> ``f(cfg, dataset_name, output_folder)`` returning
#: its DatasetEvaluator (:meth:`Trainer.build_evaluator`). Add an entry for another kind of data.
EVALUATORS = {
    "lvis": build_lvis_evaluator,
    "coco": _coco_evaluator,
    "sem_seg": build_sem_seg_evaluator,  # SemSegEvaluator + head / body / tail mIoU
}


def clip_full_model_gradients(optimizer, max_norm: float, norm_type: float = 2.0):
    """Make ``optimizer.step()`` first clip the ``norm_type``-norm of the gradients of all its
    parameters, taken together, to ``max_norm`` (``torch.nn.utils.clip_grad_norm_``). Uses
    detectron2's own optimizer-with-clipping class (its global clipper), as its "norm" clipping
    does per parameter. Returns ``optimizer`` (its class swapped, its state untouched)."""

    def clip_all(params):
        torch.nn.utils.clip_grad_norm_(list(params), max_norm, norm_type)

    clipped = solver_build._generate_optimizer_class_with_gradient_clipping(
        type(optimizer), global_clipper=clip_all
    )
    optimizer.__class__ = clipped  # what detectron2's maybe_add_gradient_clipping does
    return optimizer


class Trainer(ResumableLoopMixin, DefaultTrainer):
    """``DefaultTrainer`` for disalign-det, running the loop of :mod:`disalign_det.engine.loop`.

    * ``build_model`` applies ``MODEL.DISALIGN.FREEZE`` with :func:`~.loop.freeze_model` (stage two
      trains only the calibration; frozen norms and dropout / drop-path in eval mode).
    * The checkpointer saves atomically with RNG state; in stage two it loads the stage-one
      checkpoint strictly (only calibration parameters may be missing).
    * ``resume_or_load(resume=True)`` continues the data stream where it stopped.
    * ``SOLVER.AMP.ENABLED`` trains under ``torch.autocast`` in ``SOLVER.AMP.PRECISION`` (bfloat16
      on CPU, float16 or bfloat16 on CUDA; see :func:`~.loop.amp_precision`).
    * Multi-process training works on CPU (gloo) as well as GPUs (see
      ``disalign_det.engine.launch``).
    * Datasets are evaluated by their metadata's ``evaluator_type`` (:data:`EVALUATORS`; LVIS with
      ``build_lvis_evaluator``: streaming LVIS evaluation, max detections tied to
      ``TEST.DETECTIONS_PER_IMAGE``); results are also written as JSON.
    * GRW class weights are installed only in the heads that ask for class frequencies
      (``install_class_weights``): a model without DisAlign heads reads no class counts.
    """

    def __init__(self, cfg):
        # Mirrors DefaultTrainer.__init__ (v0.6 and current), except for the DDP wrapper (no
        # device_ids on CPU; unused calibration parameters allowed in stage two), the inner
        # trainer (mixed precision on any device) and the checkpointer.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        register_datasets_from_cfg(cfg)  # DATASETS.LVIS_FORMAT
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        if hasattr(model, "roi_heads"):
            # Only a model with ROI heads has MODEL.ROI_HEADS.NUM_CLASSES classes to check.
            check_num_classes(cfg)
        # GRW weights: training only, never at build time (pixel counts for a segmentation model)
        install_class_weights(model, cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        precision = amp_precision(
            cfg.SOLVER.AMP.ENABLED, cfg.SOLVER.AMP.get("PRECISION", "auto"), model, key="SOLVER.AMP"
        )
        model = build_ddp_model(
            model,
            train_calibration_only=cfg.MODEL.DISALIGN.FREEZE != "none",
            broadcast_buffers=False,
        )
        self._trainer = build_train_loop(model, data_loader, optimizer, precision)
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

    def weights(self):
        return self.cfg.MODEL.WEIGHTS

    def images_per_process(self):
        return self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()

    def seed_key(self):
        return "SEED", self.cfg.SEED

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        freeze_model(model, cfg.MODEL.DISALIGN.FREEZE)
        logger.info("Model:\n%s", model)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's optimizer. ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: "full_model"`` clips the
        ``NORM_TYPE``-norm of all gradients together to ``CLIP_VALUE`` (mmdetection's
        ``grad_clip``, ECM's recipe; detectron2's "norm" clips each parameter's gradient on its
        own); "value" and "norm" are detectron2's."""
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if not (clip.ENABLED and clip.CLIP_TYPE == "full_model"):
            return super().build_optimizer(cfg, model)
        plain = cfg.clone()
        plain.defrost()
        plain.SOLVER.CLIP_GRADIENTS.ENABLED = False
        optimizer = super().build_optimizer(plain, model)
        return clip_full_model_gradients(optimizer, clip.CLIP_VALUE, clip.NORM_TYPE)

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
        generator for the DataLoader's base seed (see :func:`~.loop.private_generator`)."""
        from detectron2.data.build import _train_loader_from_config

        kwargs = _train_loader_from_config(cfg)
        return build_resumable_train_loader(
            kwargs["dataset"],
            mapper=NamedErrorMapper(kwargs["mapper"]),
            sampler=kwargs["sampler"],
            total_batch_size=kwargs["total_batch_size"],
            aspect_ratio_grouping=kwargs["aspect_ratio_grouping"],
            num_workers=kwargs["num_workers"],
            generator=private_generator(),
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
        """The evaluator of ``dataset_name``'s ``evaluator_type`` (:data:`EVALUATORS`)."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = getattr(MetadataCatalog.get(dataset_name), "evaluator_type", None)
        if evaluator_type not in EVALUATORS:
            raise NotImplementedError(
                f"No evaluator for dataset {dataset_name!r} (DATASETS.TEST): its metadata's "
                f"evaluator_type is {evaluator_type!r}, known: {sorted(EVALUATORS)}. Set "
                "evaluator_type when registering it, add an entry to "
                "disalign_det.engine.trainer.EVALUATORS, or override Trainer.build_evaluator."
            )
        return EVALUATORS[evaluator_type](cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's evaluation; with ``TEST.LVIS_EVAL.FIXED_AP`` and ``FIXED_AP_PRUNE`` each
        test dataset is run on its own, with a fresh :class:`~disalign_det.evaluation.fixed_ap.
        FixedAPPruner` (its thresholds are one dataset's)."""
        node = cfg.TEST.get("LVIS_EVAL", None)
        if node is None or not (node.FIXED_AP and node.get("FIXED_AP_PRUNE", False)):
            results = super().test(cfg, model, evaluators)
        else:
            results = cls._test_pruned(cfg, model, evaluators, int(node.FIXED_AP_DETS_PER_CLASS))
        write_final_metrics(results, cfg.OUTPUT_DIR)
        return results

    @classmethod
    def _test_pruned(cls, cfg, model, evaluators, dets_per_class):
        names = list(cfg.DATASETS.TEST)
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        if evaluators is not None and len(evaluators) != len(names):
            raise ValueError(
                f"{len(evaluators)} evaluators for {len(names)} datasets in DATASETS.TEST"
            )
        results = OrderedDict()
        for i, name in enumerate(names):
            one = cfg.clone()
            one.defrost()
            one.DATASETS.TEST = (name,)
            if evaluators is not None:
                evaluator = [evaluators[i]]
            else:
                # Built from the whole config: the per-class table's file name depends on how
                # many test datasets it has.
                try:
                    evaluator = [cls.build_evaluator(cfg, name)]
                except NotImplementedError:
                    evaluator = None  # detectron2's test warns and skips it, as without pruning
            pruner = FixedAPPruner(dets_per_class, DEFAULT_MAX_DETS_PER_IMAGE)
            with pruning_before_masks(model, pruner):
                results[name] = super().test(one, model, evaluator)
        return results[names[0]] if len(names) == 1 else results

    def train(self):
        """Train; returns the last evaluation results (detectron2 returns them only when
        TEST.EXPECTED_RESULTS is set)."""
        results = super().train()
        return results if results is not None else getattr(self, "_last_eval_results", None)

    def build_hooks(self):
        """detectron2's hooks plus the loop's (:meth:`~.loop.ResumableLoopMixin.add_loop_hooks`:
        progress display, RNG states of every rank)."""
        return self.add_loop_hooks(super().build_hooks(), self.cfg.SOLVER.CHECKPOINT_PERIOD)
