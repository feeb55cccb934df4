#!/usr/bin/env python
"""Speed of a DisAlign stage-two iteration on a segmentation model, relative to the same model's
no-grad forward on the same batch (goal: <= 1.15x), measured in one run.

    python tools/benchmark_speed_sem_seg.py [--rounds 3] [--ade-size 512] [--ade-batch 1]

Models: the ADE20K DisAlign DeepLabV3+ R50-D8 stage two (configs/ADE20K/, random weights, plain BN
instead of SyncBN, ``--ade-size`` square crops) and the CPU config on the generated data
(configs/ADE20K/synthetic/, 4 images of 112 x 144). For each: the median over ``--rounds`` of

* forward: ``model(batch)`` in training mode (losses computed) under ``torch.no_grad()``;
* iteration: forward, backward and an SGD step of the trainable (calibration) parameters, i.e.
  what the trainer does per stage-two iteration.

The ratio iteration / forward is the cost of training the calibration on top of running the
frozen model. Timings on a shared CPU vary; the ratio is measured within one process.
"""

import argparse
import os
import time

import torch

import disalign_det  # noqa: F401  isort: skip  (shims and registrations first)
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from disalign_det import add_disalign_config
from disalign_det.modeling import apply_freeze
from lab.stats import median

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADE = "configs/ADE20K/disalign_deeplab_v3_plus_R_50_D8_512x512_4k.yaml"
CPU = "configs/ADE20K/synthetic/disalign_semantic_fpn_synth.yaml"


def _model(config, opts):
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, config))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts])
    for node in (cfg.MODEL.RESNETS, cfg.MODEL.SEM_SEG_HEAD):
        node.NORM = "BN" if node.NORM == "SyncBN" else node.NORM  # no process group here
    model = build_model(cfg)
    apply_freeze(model, cfg.MODEL.DISALIGN.FREEZE)
    head = model.sem_seg_head
    head.set_class_frequencies(torch.arange(1, head.predictor.out_channels + 1).float())
    return model.train()


def _batch(n, h, w, num_classes):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randint(0, 255, (3, h, w), generator=g).float(),
            "sem_seg": torch.randint(0, num_classes, (h, w), generator=g),
        }
        for _ in range(n)
    ]


def measure(model, batch, rounds):
    """(median no-grad forward seconds, median iteration seconds)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def forward():
        with torch.no_grad():
            model(batch)

    def iteration():
        loss = sum(model(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    forward(), iteration()  # warm-up
    fwd, it = [], []
    for _ in range(rounds):  # interleaved, so that load changes hit both alike
        t = time.perf_counter()
        forward()
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        iteration()
        it.append(time.perf_counter() - t)
    return median(fwd), median(it)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ade-size", type=int, default=512)
    parser.add_argument("--ade-batch", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    s = args.ade_size
    cases = [
        (
            f"ADE20K DisAlign DeepLabV3+ R50-D8, {args.ade_batch} x {s}x{s}",
            _model(ADE, ["INPUT.CROP.SIZE", f"({s}, {s})"]),
            _batch(args.ade_batch, s, s, 150),
        ),
        ("CPU config (generated data), 4 x 112x144", _model(CPU, []), _batch(4, 112, 144, 61)),
    ]
    print(f"torch threads: {torch.get_num_threads()}, rounds: {args.rounds}")
    print("| model | no-grad forward (s) | stage-two iteration (s) | ratio |")
    print("|---|---|---|---|")
    out = {}
    for name, model, batch in cases:
        fwd, it = measure(model, batch, args.rounds)
        out[name] = (fwd, it, it / fwd)
        print(f"| {name} | {fwd:.3f} | {it:.3f} | {it / fwd:.3f}x |", flush=True)
    return out


if __name__ == "__main__":
    main()
