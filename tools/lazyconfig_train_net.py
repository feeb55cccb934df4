#!/usr/bin/env python
"""Train and evaluate LazyConfig (Python) configs, e.g. DisAlign stage two on ViTDet's LVIS models.

Stage two from ViTDet's published LVIS Mask R-CNN ViT-B (downloaded by detectron2):
    DETECTRON2_ROOT=/path/to/detectron2 python tools/lazyconfig_train_net.py --num-gpus 8 \
        --config-file configs/LVIS/disalign_mask_rcnn_vitdet_b_100ep.py
From a stage one of your own:
    ... --config-file CONFIG.py train.init_checkpoint=path/to/model_final.pth
Evaluation only:
    ... --config-file CONFIG.py --eval-only train.init_checkpoint=output/.../model_final.pth

KEY=VALUE overrides as in detectron2's tools/lazyconfig_train_net.py. On machines without CUDA,
--num-gpus N starts N CPU processes (gloo); add train.device=cpu.
"""

import logging
import os

import disalign_det  # isort: skip  (a real _C or the stand-in, before detectron2.layers)
from detectron2.config import LazyConfig
from detectron2.engine import default_argument_parser, default_setup  # noqa: F401  (re-export)
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from disalign_det.engine import launch_from_argv
from disalign_det.engine.run_folder import preflight_lazy, remove_stale_temporaries
from disalign_det.lazy.train import do_eval_only, do_train, freeze_mode

logger = logging.getLogger("disalign_det.lazyconfig_train_net")


def setup(args):
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file {args.config_file!r} does not exist")
    if not args.config_file.endswith(".py"):
        raise ValueError(
            f"--config-file {args.config_file!r} is not a Python (LazyConfig) config; YAML configs "
            "train with tools/train_net.py"
        )
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    for key in ("model", "dataloader", "train"):
        if key not in cfg:
            raise ValueError(f"{args.config_file}: a LazyConfig for this script needs `{key}`")
    out = cfg.train.output_dir
    resumable = args.resume and os.path.isfile(os.path.join(out, "last_checkpoint"))
    if freeze_mode(cfg) != "none" and not cfg.train.init_checkpoint and not resumable:
        # Validated before default_setup, which writes the config into train.output_dir.
        raise ValueError(
            f"disalign.freeze={freeze_mode(cfg)!r} (stage two) needs the stage-one checkpoint: "
            "add train.init_checkpoint=path/to/stage_one/model_final.pth"
            + (f" (--resume found no last_checkpoint in {out!r})" if args.resume else "")
        )
    # disalign.freeze, every dataset file and image, last_checkpoint (docs/errors.md).
    preflight_lazy(cfg, resume=args.resume, eval_only=args.eval_only)
    remove_stale_temporaries(out)  # a killed save's *.tmp.<pid>, once all checks pass
    default_setup(cfg, args)
    # default_setup sets up detectron2's and fvcore's loggers only; ours log to the same places.
    setup_logger(out, distributed_rank=comm.get_rank(), name="disalign_det")
    return cfg


def main(args):
    disalign_det.compat.apply_legacy_shims()  # numpy aliases: detectron2 v0.6, lvis
    cfg = setup(args)
    if args.eval_only:
        results = do_eval_only(cfg, resume=args.resume)
        if comm.is_main_process():
            logger.info("Evaluation results: %s", results)
        return results
    return do_train(cfg, resume=args.resume)


def cli(argv=None):
    return launch_from_argv(main, argv)


if __name__ == "__main__":
    cli()
