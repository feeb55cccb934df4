"""Per classifier type (softmax, cosine, sigmoid, sigmoid + federated loss), in one run: does
DisAlign stage two start from the stage one's predictions (same instances, max |score difference|,
identical masks), and what does a stage-two iteration cost relative to its no-grad forward pass.

    python tools/benchmark_classifiers.py [--iters 10] [--classes 6]

The sigmoid classifiers need detectron2 main (``MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE``); on v0.6 they
are reported as unavailable. Data: a small generated LVIS-format dataset (64 px images at the
synthetic configs' 128 px input, R18-FPN); the stage one is a random initialisation with
non-trivial predictions.
"""

import argparse
import copy
import itertools
import logging
import statistics
import tempfile
import time

import torch

logger = logging.getLogger("disalign_det.tools.benchmark_classifiers")

# classifier -> (stage-one config, stage-two config, extra options of both)
CLASSIFIERS = {
    "softmax": ("mask_rcnn_synth.yaml", "disalign_synth.yaml", []),
    "cosine": ("mask_rcnn_synth_cosine.yaml", "disalign_synth_cosine.yaml", []),
    "sigmoid": ("mask_rcnn_synth.yaml", "disalign_synth.yaml",
                ["MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "True"]),
    "sigmoid+fed": ("mask_rcnn_synth.yaml", "disalign_synth.yaml",
                    ["MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "True",
                     "MODEL.ROI_BOX_HEAD.USE_FED_LOSS", "True",
                     "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES", "8"]),
}  # fmt: skip


def _cfg(config, opts, names):
    import os

    from detectron2.config import get_cfg

    from disalign_det.config import add_disalign_config

    cfg = get_cfg()
    add_disalign_config(cfg)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg.merge_from_file(os.path.join(here, "configs", "LVIS", "synthetic", config))
    cfg.merge_from_list(["DATASETS.TRAIN", f"('{names[0]}',)", "DATASETS.TEST", f"('{names[1]}',)",
                         "MODEL.ROI_HEADS.NUM_CLASSES", str(names[2]), "INPUT.RANDOM_FLIP",
                         "none", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", *opts])  # fmt: skip
    return cfg


def _stage_one_state(cfg):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        pred = model.roi_heads.box_predictor
        pred.cls_score.weight.normal_(std=0.05)
        if getattr(pred.cls_score, "bias", None) is not None:
            pred.cls_score.bias.fill_(-1.0)
        model.roi_heads.mask_head.predictor.weight.normal_(std=0.1)
    return model, copy.deepcopy(model.state_dict())


def _stage_two(cfg, state):
    from disalign_det.engine import Trainer
    from disalign_det.modeling import install_class_weights
    from disalign_det.modeling.freeze import is_disalign_state

    model = Trainer.build_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert all(is_disalign_state(k) for k in missing) and not unexpected, (missing, unexpected)
    install_class_weights(model, cfg)
    return model


def identity(m1, m2, images):
    """(instances, max |score diff|, masks identical, classes identical) on ``images``."""
    m1.eval(), m2.eval()
    with torch.no_grad():
        out1, out2 = m1(images), m2(images)
    n, worst, same = 0, 0.0, True
    for a, b in zip(out1, out2):
        a, b = a["instances"], b["instances"]
        if len(a) != len(b):
            return n, float("inf"), False
        same &= bool(torch.equal(a.pred_classes, b.pred_classes))
        same &= bool(torch.equal(a.pred_masks, b.pred_masks))
        n += len(a)
        if len(a):
            worst = max(worst, (a.scores - b.scores).abs().max().item())
    return n, worst, same


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=10, help="timed iterations per measure")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--classes", type=int, default=6)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import inspect

    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.engine import SimpleTrainer
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
    from detectron2.utils.events import EventStorage

    from disalign_det.compat import apply_legacy_shims
    from disalign_det.data import generate_synthetic_lvis, register_lvis_format
    from disalign_det.engine import Trainer

    apply_legacy_shims()  # numpy aliases: detectron2 v0.6's data loader
    has_sigmoid = "use_sigmoid_ce" in inspect.signature(FastRCNNOutputLayers.__init__).parameters
    out = tempfile.mkdtemp(prefix="bench_cls_")
    paths = generate_synthetic_lvis(out, seed=0, num_classes=args.classes, num_train_images=30,
                                    num_val_images=12, image_size=64)  # fmt: skip
    names = ("bench_cls_train", "bench_cls_val", args.classes)
    register_lvis_format(names[0], paths["train_json"], paths["image_root"])
    register_lvis_format(names[1], paths["val_json"], paths["image_root"])

    benches = {}
    for name, (c1, c2, opts) in CLASSIFIERS.items():
        if "USE_SIGMOID_CE" in " ".join(opts) and not has_sigmoid:
            print(f"{name:12s} unavailable (this detectron2 has no sigmoid classifier)")
            continue
        cfg1, cfg2 = _cfg(c1, opts, names), _cfg(c2, opts, names)
        m1, state = _stage_one_state(cfg1)
        m2 = _stage_two(cfg2, state)
        val = [DatasetMapper(cfg1, is_train=False)(d) for d in DatasetCatalog.get(names[1])]
        ident = identity(m1, copy.deepcopy(m2), val)
        batch = [DatasetMapper(cfg2, is_train=True)(d) for d in DatasetCatalog.get(names[0])[:2]]
        m2.train()
        trainer = SimpleTrainer(m2, itertools.repeat(batch), Trainer.build_optimizer(cfg2, m2))
        benches[name] = (ident, m2, trainer, batch)

    times = {n: {"iter": [], "forward": []} for n in benches}
    with EventStorage(0):
        for r in range(args.warmup + args.iters):
            for name, (_, m2, trainer, batch) in benches.items():  # interleaved: same conditions
                t = time.perf_counter()
                trainer.run_step()
                t_iter = time.perf_counter() - t
                t = time.perf_counter()
                with torch.no_grad():
                    m2(batch)
                t_fwd = time.perf_counter() - t
                if r >= args.warmup:
                    times[name]["iter"].append(t_iter)
                    times[name]["forward"].append(t_fwd)

    print(f"\n{'classifier':12s} {'instances':>9s} {'max|dscore|':>12s} {'same cls+masks':>14s} "
          f"{'iter s':>8s} {'fwd s':>8s} {'iter/fwd':>8s}")  # fmt: skip
    for name, (ident, *_) in benches.items():
        it = statistics.median(times[name]["iter"])
        fw = statistics.median(times[name]["forward"])
        n, worst, same = ident
        print(f"{name:12s} {n:9d} {worst:12.2e} {str(same):>14s} {it:8.3f} {fw:8.3f} "
              f"{it / fw:8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
