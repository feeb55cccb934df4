#!/usr/bin/env python
"""Train and evaluate Mask R-CNN (stage one) and DisAlign (stage two) on LVIS-format data.

Stage one:
    python tools/train_net.py --config-file configs/LVIS/mask_rcnn_R_50_FPN_2x.yaml --num-gpus 8
Stage two (DisAlign), from a stage-one checkpoint:
    python tools/train_net.py --config-file configs/LVIS/disalign_mask_rcnn.yaml --num-gpus 8 \
        MODEL.WEIGHTS output/lvis/mask_rcnn_R_50_FPN_2x/model_final.pth
Evaluation only:
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth

On machines without CUDA, --num-gpus N starts N CPU processes (gloo).
"""

import logging
import os

# Known third-party deprecation noise hidden (disalign_det.utils.warnings); before the import.
os.environ.setdefault("DISALIGN_QUIET_WARNINGS", "1")

import disalign_det  # noqa: E402  isort: skip  (a real _C or the stand-in, registrations)

disalign_det.compat.apply_legacy_shims()  # numpy aliases: detectron2 v0.6's loader, lvis
from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup  # noqa: E402,F401  (re-export)
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from disalign_det import add_disalign_config  # noqa: E402
from disalign_det.engine import Trainer, launch_from_argv  # noqa: E402
from disalign_det.engine.run_folder import preflight, remove_stale_temporaries  # noqa: E402
from disalign_det.engine.strict_load import load_for_inference  # noqa: E402
from disalign_det.evaluation import apply_fixed_ap_config  # noqa: E402
from disalign_det.model_zoo import merge_config_file  # noqa: E402

logger = logging.getLogger("disalign_det.train_net")


def setup(args):
    cfg = get_cfg()
    add_disalign_config(cfg)
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file {args.config_file!r} does not exist")
    merge_config_file(cfg, args.config_file)  # _BASE_ may be "model_zoo:<path>"
    cfg.merge_from_list(args.opts)
    apply_fixed_ap_config(cfg)  # TEST.LVIS_EVAL.FIXED_AP: no per-image cap at inference
    cfg.freeze()
    # Validate before default_setup: it writes OUTPUT_DIR/config.yaml, which must not replace the
    # config of an earlier run in that folder with one that cannot run. Config values, every
    # dataset file and image, last_checkpoint (docs/errors.md):
    preflight(cfg, resume=args.resume, eval_only=args.eval_only)
    resumable = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if cfg.MODEL.DISALIGN.FREEZE != "none" and not cfg.MODEL.WEIGHTS and not resumable:
        raise ValueError(
            f"MODEL.DISALIGN.FREEZE={cfg.MODEL.DISALIGN.FREEZE!r} (stage two) needs the stage-one "
            "checkpoint: add MODEL.WEIGHTS path/to/stage_one/model_final.pth"
            + (
                f" (--resume found no last_checkpoint in OUTPUT_DIR {cfg.OUTPUT_DIR!r})"
                if args.resume
                else ""
            )
        )
    remove_stale_temporaries(cfg.OUTPUT_DIR)  # a killed save's *.tmp.<pid>, once all checks pass
    default_setup(cfg, args)
    # default_setup sets up detectron2's and fvcore's loggers only: ours (disalign_det.*, e.g. the
    # evaluator, GRW weights, Fixed AP pruning) go to the same console and OUTPUT_DIR/log.txt.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="disalign_det")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # Exactly this model's tensors, or an error naming them (not random heads).
        load_for_inference(model, cfg.MODEL.WEIGHTS, save_dir=cfg.OUTPUT_DIR, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    return launch_from_argv(main, argv)


if __name__ == "__main__":
    cli()
