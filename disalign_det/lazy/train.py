"""Training and evaluation of LazyConfig models with the loop of the YAML path.

What ``tools/lazyconfig_train_net.py`` runs: :class:`LazyTrainer` is the LazyConfig twin of
:class:`~disalign_det.engine.Trainer`, built from ``cfg.model`` / ``cfg.dataloader`` /
``cfg.optimizer`` / ``cfg.lr_multiplier`` / ``cfg.train`` and running the same loop
(:mod:`disalign_det.engine.loop`): the same inner trainer (non-finite losses named before the
optimizer step, ``train.amp`` mixed precision), the same freezing (norms and dropout / drop-path in
eval mode), the same resumable data stream (exact after a kill, with workers and mixed aspect
ratios), the same checkpointer (the stage one loaded strictly: only DisAlign's own keys may be
missing; atomic saves with every rank's RNG state) and CPU multi-process runs (gloo).
"""

import logging
import weakref

import torch
from detectron2.config import instantiate
from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import TrainerBase, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..data import get_class_counts
from ..data.samplers import build_resumable_train_loader
from ..engine.checkpoint import DisAlignCheckpointer
from ..engine.loop import (
    NamedErrorMapper,
    ResumableLoopMixin,
    amp_precision,
    build_ddp_model,
    build_train_loop,
    freeze_model,
    private_generator,
    walk_loader,
    write_final_metrics,
)
from ..modeling import set_class_frequencies
from .swap import _target

__all__ = [
    "LazyTrainer",
    "build_checkpointer",
    "build_stage_two_model",
    "build_train_loader",
    "do_eval_only",
    "do_test",
    "do_train",
    "freeze_mode",
    "install_lazy_class_weights",
]

logger = logging.getLogger(__name__)


def freeze_mode(cfg):
    """``cfg.disalign.freeze``, or "none" for a config without a ``disalign`` node (stage one)."""
    node = cfg.get("disalign") if hasattr(cfg, "get") else None
    return node.get("freeze", "none") if node is not None else "none"


def build_stage_two_model(cfg):
    """``instantiate(cfg.model)`` on ``cfg.train.device``, frozen by ``cfg.disalign.freeze``."""
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    freeze_model(model, freeze_mode(cfg))
    logger.info("Model:\n%s", model)
    return model


def _dataset_names(cfg):
    names = cfg.disalign.get("train_datasets") if "disalign" in cfg else None
    if names is None:
        dataset = cfg.dataloader.train.get("dataset")
        names = dataset.get("names") if hasattr(dataset, "get") else None
    if names is None:
        raise ValueError(
            "A head of the model needs the training class frequencies (GRW weights) but the "
            "config names no registered dataset: set disalign.train_datasets (or "
            "dataloader.train.dataset.names)."
        )
    return [names] if isinstance(names, str) else list(names)


def install_lazy_class_weights(model, cfg):
    """Give the DisAlign heads of ``model`` the class frequencies of ``dataloader.train.dataset``
    (``cfg.disalign.frequency_source``), computed once; their GRW weights follow (each head's rho).
    Returns the (K,) counts, or None when no head needs them."""
    needs = [m for m in model.modules() if getattr(m, "needs_class_frequencies", False)]
    if not needs:
        return None
    names = _dataset_names(cfg)
    source = (cfg.get("disalign") or {}).get("frequency_source", "instance_count")
    counts = get_class_counts(names, source)
    set_class_frequencies(model, counts)
    logger.info("GRW class weights from %s (%s) installed in %d head(s)", names, source, len(needs))
    return counts


def build_train_loader(cfg):
    """``cfg.dataloader.train``, built as the YAML path builds it when its target is detectron2's
    ``build_detection_train_loader``: the same arguments given to
    :func:`~disalign_det.data.samplers.build_resumable_train_loader` (aspect-ratio grouping on
    indices in the main process, per-image seeds with workers: exact resumes), the sampler
    (default: ``TrainingSampler``), a mapper whose errors name the image and a private generator
    for the workers' base seed. Any other target is instantiated as it is: a resumed run then warns
    that its data order restarts."""
    node = cfg.dataloader.train
    if _target(node) is not build_detection_train_loader:
        logger.warning(
            "dataloader.train._target_ is %s, not detectron2's build_detection_train_loader: "
            "built as it is, without exact resumes.",
            node.get("_target_"),
        )
        loader = instantiate(node)
        for part in walk_loader(loader):
            if isinstance(part, torch.utils.data.DataLoader) and part.generator is None:
                part.generator = private_generator()
        return loader
    args = {
        k: instantiate(v) for k, v in node.items() if k not in ("_target_", "dataset", "sampler")
    }
    dataset = instantiate(node.dataset)
    sampler = instantiate(node.sampler) if node.get("sampler") is not None else None
    if sampler is None:
        sampler = TrainingSampler(len(dataset))
    if args.get("mapper") is None:
        raise ValueError("dataloader.train.mapper is required (a dataset dict -> model input)")
    args["mapper"] = NamedErrorMapper(args["mapper"])
    if not isinstance(dataset, list):
        raise TypeError(
            f"dataloader.train.dataset must build a list of dataset dicts (e.g. "
            f"get_detection_dataset_dicts), got {type(dataset).__name__}"
        )
    args.setdefault("generator", private_generator())
    return build_resumable_train_loader(dataset, sampler=sampler, **args)


def do_test(cfg, model):
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator`` (the
    dataset's own ``DatasetEvaluator``); the results are also written to
    ``<train.output_dir>/metrics_final.json``."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    write_final_metrics(results, cfg.train.output_dir)
    return results


def build_checkpointer(cfg, model, **checkpointables):
    return DisAlignCheckpointer(
        model,
        cfg.train.output_dir,
        strict_stage_one=freeze_mode(cfg) != "none",
        **checkpointables,
    )


class LazyTrainer(ResumableLoopMixin, TrainerBase):
    """The LazyConfig twin of :class:`~disalign_det.engine.Trainer`, on the same loop.

    ``cfg`` is a LazyConfig with ``model``, ``dataloader``, ``optimizer``, ``lr_multiplier``,
    ``train`` (``train.amp.enabled`` / ``train.amp.precision``: mixed precision as
    ``SOLVER.AMP``) and optionally ``disalign`` (stage two). Use as detectron2's trainers:
    ``t = LazyTrainer(cfg); t.resume_or_load(resume); results = t.train()``; override
    :meth:`build_hooks` to add hooks."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        model = build_stage_two_model(cfg)
        install_lazy_class_weights(model, cfg)
        cfg.optimizer.params.model = model
        optimizer = instantiate(cfg.optimizer)
        loader = build_train_loader(cfg)
        amp = cfg.train.get("amp") or {}
        precision = amp_precision(
            amp.get("enabled", False), amp.get("precision", "auto"), model, key="train.amp"
        )
        model = build_ddp_model(
            model,
            train_calibration_only=freeze_mode(cfg) != "none",
            **dict(cfg.train.get("ddp") or {}),
        )
        self._trainer = build_train_loop(model, loader, optimizer, precision)
        self.checkpointer = build_checkpointer(cfg, model, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.train.max_iter
        self.register_hooks(self.build_hooks())

    @property
    def model(self):
        return self._trainer.model

    @property
    def data_loader(self):
        return self._trainer.data_loader

    @property
    def optimizer(self):
        return self._trainer.optimizer

    def weights(self):
        return self.cfg.train.init_checkpoint

    def images_per_process(self):
        return self.cfg.dataloader.train.total_batch_size // comm.get_world_size()

    def seed_key(self):
        return "train.seed", self.cfg.train.get("seed", -1)

    def evaluate(self):
        """``do_test`` of the trained model; kept as the last evaluation results."""
        self._last_eval_results = do_test(self.cfg, self.model)
        return self._last_eval_results

    def build_hooks(self):
        cfg, main = self.cfg, comm.is_main_process()
        ret = [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(self.checkpointer, **cfg.train.checkpointer)
                if main
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, self.evaluate),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if main
                else None
            ),
        ]
        return self.add_loop_hooks(ret, cfg.train.checkpointer.period)

    def train(self):
        """Train; returns the last evaluation results ({} without an evaluator)."""
        super().train(self.start_iter, self.max_iter)
        return getattr(self, "_last_eval_results", {})


def do_train(cfg, resume=False):
    """Train ``cfg`` with :class:`LazyTrainer`; returns the last evaluation results."""
    trainer = LazyTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    return trainer.train()


def do_eval_only(cfg, resume=False):
    """Build, load ``train.init_checkpoint`` (or the last checkpoint with ``resume``), evaluate."""
    model = build_stage_two_model(cfg)
    build_checkpointer(cfg, model).resume_or_load(cfg.train.init_checkpoint, resume=resume)
    with torch.no_grad():
        return do_test(cfg, model)
