"""Training and evaluation of LazyConfig models with the guarantees of the YAML path.

What ``tools/lazyconfig_train_net.py`` runs, reusing the engine of the YAML path: the stage one is
loaded by :class:`~disalign_det.engine.DisAlignCheckpointer` in strict mode (only DisAlign's own
keys may be missing), saves are atomic with RNG states, a resumed run continues the data stream, a
non-finite loss stops training naming it before the optimizer step, and CPU multi-process runs
work (gloo).
"""

import json
import logging
import os

import torch
from detectron2.config import instantiate
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from torch import nn

from ..data import get_class_counts
from ..data.samplers import GroupedBatchSampler
from ..engine.checkpoint import DisAlignCheckpointer
from ..engine.trainer import (
    NamedErrorMapper,
    ResumableSampler,
    _AMPTrainer,
    _find_loader_part,
    _GatherRNGStates,
    _jsonable,
    _private_generator,
    _SimpleTrainer,
    _walk_loader,
    model_on_cuda,
)
from ..modeling import apply_freeze, set_class_frequencies
from .swap import _target

__all__ = [
    "build_stage_two_model",
    "build_train_loader",
    "do_test",
    "do_train",
    "freeze_mode",
    "install_lazy_class_weights",
    "prepare_stage_two",
]

logger = logging.getLogger(__name__)


def freeze_mode(cfg):
    """``cfg.disalign.freeze``, or "none" for a config without a ``disalign`` node (stage one)."""
    node = cfg.get("disalign") if hasattr(cfg, "get") else None
    return node.get("freeze", "none") if node is not None else "none"


def _is_stochastic(module):
    # Dropout and stochastic depth (timm's DropPath in ViT, MViTv2, Swin).
    return isinstance(module, nn.modules.dropout._DropoutNd) or type(module).__name__ == "DropPath"


def _keep_eval(module, inputs):
    module.training = False


def prepare_stage_two(model, freeze="all_but_calibration"):
    """Freeze ``model`` in place (``apply_freeze``: everything but the calibration; frozen norms in
    eval mode) and keep every dropout / drop-path layer without a trainable parameter after it in
    eval mode: a frozen ViT would otherwise feed the calibration with randomly dropped residual
    branches (ViTDet trains with drop_path_rate 0.1-0.5), features it never sees at inference.

    Returns:
        ``model``.
    """
    apply_freeze(model, freeze)
    if freeze == "none":
        return model
    for name, module in model.named_modules():
        if _is_stochastic(module) and not any(p.requires_grad for p in module.parameters()):
            module.eval()
            module.register_forward_pre_hook(_keep_eval)
    return model


def build_stage_two_model(cfg):
    """``instantiate(cfg.model)`` on ``cfg.train.device``, frozen by ``cfg.disalign.freeze``."""
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    prepare_stage_two(model, freeze_mode(cfg))
    logger.info("Model:\n%s", model)
    return model


def _dataset_names(cfg):
    names = cfg.disalign.get("train_datasets") if "disalign" in cfg else None
    if names is None:
        names = cfg.dataloader.train.dataset.names
    return [names] if isinstance(names, str) else list(names)


def install_lazy_class_weights(model, cfg):
    """Give the DisAlign heads of ``model`` the class frequencies of ``dataloader.train.dataset``
    (``cfg.disalign.frequency_source``), computed once; their GRW weights follow (each head's rho).
    Returns the (K,) counts, or None when no head needs them."""
    needs = [m for m in model.modules() if getattr(m, "needs_class_frequencies", False)]
    if not needs:
        return None
    names = _dataset_names(cfg)
    source = cfg.disalign.get("frequency_source", "instance_count")
    counts = get_class_counts(names, source)
    set_class_frequencies(model, counts)
    logger.info("GRW class weights from %s (%s) installed in %d head(s)", names, source, len(needs))
    return counts


def build_train_loader(cfg):
    """``cfg.dataloader.train`` instantiated with its sampler (default: ``TrainingSampler``) wrapped
    in a :class:`ResumableSampler`, a mapper whose errors name the image and a private generator
    (see ``disalign_det.engine.trainer``)."""
    node = cfg.dataloader.train
    build = _target(node)
    args = {
        k: instantiate(v) for k, v in node.items() if k not in ("_target_", "dataset", "sampler")
    }
    dataset = instantiate(node.dataset)
    sampler = instantiate(node.sampler) if node.get("sampler") is not None else None
    if sampler is None:
        sampler = TrainingSampler(len(dataset))
    if "mapper" in args:
        args["mapper"] = NamedErrorMapper(args["mapper"])
    loader = build(dataset=dataset, sampler=ResumableSampler(sampler), **args)
    # The DataLoader's worker base seed from a private generator, as in Trainer.build_train_loader
    # (see engine.trainer._private_generator: exact resumes).
    for part in _walk_loader(loader):
        if isinstance(part, torch.utils.data.DataLoader) and part.generator is None:
            part.generator = _private_generator()
    return loader


def do_test(cfg, model):
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``; the results
    are also written to ``<train.output_dir>/metrics_final.json``."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
        out = cfg.train.output_dir
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "metrics_final.json"), "w") as f:
                json.dump(_jsonable(results), f, indent=2)
    return results


def build_checkpointer(cfg, model, **checkpointables):
    return DisAlignCheckpointer(
        model,
        cfg.train.output_dir,
        strict_stage_one=freeze_mode(cfg) != "none",
        **checkpointables,
    )


def do_train(cfg, resume=False):
    """Train ``cfg`` (a LazyConfig with ``model``, ``dataloader``, ``optimizer``, ``lr_multiplier``,
    ``train`` and optionally ``disalign``); returns the last evaluation results."""
    model = build_stage_two_model(cfg)
    install_lazy_class_weights(model, cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = build_train_loader(cfg)

    ddp = dict(cfg.train.get("ddp") or {})
    if freeze_mode(cfg) != "none":
        # A branch can see no foreground in a batch: its calibration gets no gradient there.
        ddp["find_unused_parameters"] = True
    if not model_on_cuda(model):
        # CPU processes (gloo): no device ids, and no fp16 gradient compression (ViTDet's GPU
        # bandwidth setting; gloo's all-reduce gains nothing from it).
        ddp["device_ids"] = None
        ddp["fp16_compression"] = False
    model = create_ddp_model(model, **ddp)
    trainer_cls = _AMPTrainer if cfg.train.amp.enabled else _SimpleTrainer
    trainer = trainer_cls(model, loader, optimizer)
    checkpointer = build_checkpointer(cfg, model, trainer=trainer)
    period = cfg.train.checkpointer.period
    results = {}

    def evaluate():
        results.clear()
        results.update(do_test(cfg, model))
        return results

    main = comm.is_main_process()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            _GatherRNGStates(checkpointer, period) if comm.get_world_size() > 1 else None,
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
            hooks.EvalHook(cfg.train.eval_period, evaluate),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if main
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    if start_iter > 0:
        per_process = cfg.dataloader.train.total_batch_size // comm.get_world_size()
        batch_sampler = _find_loader_part(loader, GroupedBatchSampler)
        sampler = _find_loader_part(loader, ResumableSampler)
        if batch_sampler is not None:
            # A resumable loader (e.g. the classification one): batch i feeds iteration i, with
            # the per-image seeds of an uninterrupted run.
            batch_sampler.start = start_iter
        elif sampler is not None:
            sampler.start = start_iter * per_process
    trainer.train(start_iter, cfg.train.max_iter)
    return results


def do_eval_only(cfg, resume=False):
    """Build, load ``train.init_checkpoint`` (or the last checkpoint with ``resume``), evaluate."""
    model = build_stage_two_model(cfg)
    build_checkpointer(cfg, model).resume_or_load(cfg.train.init_checkpoint, resume=resume)
    with torch.no_grad():
        return do_test(cfg, model)
