#!/usr/bin/env python
"""Cost of a DisAlign stage-two iteration on ViTDet (LazyConfig, sigmoid CE + federated loss),
measured in ONE run on a CPU-sized ViTDet (tiny ViT, 1203 classes, 128 px input).

    DETECTRON2_ROOT=/path/to/detectron2 python tools/benchmark_lazyconfig.py [--iters 10]

Ratios printed (the same definitions as tools/benchmark_speed.py):

* stage-two iteration (our ``SimpleTrainer.run_step``: forward, backward, metrics, optimizer step;
  no data loading) / the same model's forward pass in training mode without gradients;
* stage-two iteration / stage-one iteration (ViTDet's own config, everything training).

Both models come from the repository's configs (configs/LVIS/disalign_mask_rcnn_vitdet_b_100ep.py
and ViTDet's projects/ViTDet/configs/LVIS/mask_rcnn_vitdet_b_100ep.py), shrunk the same way; the
batch (2 images with random boxes and masks) is built once and reused, the LR is 0 so that every
iteration does the same work. Measurements take turns inside each round; medians are printed.
"""

import argparse
import itertools
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import disalign_det  # noqa: E402  isort: skip

disalign_det.compat.apply_legacy_shims()  # numpy aliases: detectron2 v0.6's loader, lvis

K = 1203
SIZE = 128


def shrink(cfg):
    """Make a ViTDet LazyConfig CPU-sized in place (tiny ViT, 128 px, small heads)."""
    from detectron2.layers import ShapeSpec

    c, f = 32, 64
    model = cfg.model
    model.backbone.net.update(
        img_size=SIZE, embed_dim=48, depth=2, num_heads=2, window_size=4, window_block_indexes=[0]
    )
    model.backbone.update(out_channels=c, square_pad=SIZE)
    model.proposal_generator.head.in_channels = c
    model.proposal_generator.update(pre_nms_topk=(200, 100), post_nms_topk=(64, 40))
    r = model.roi_heads
    r.batch_size_per_image = 32
    r.box_head.update(input_shape=ShapeSpec(channels=c, height=7, width=7), conv_dims=[c])
    r.box_head.fc_dims = [f]
    r.box_predictor.input_shape = ShapeSpec(channels=f)
    r.mask_head.update(input_shape=ShapeSpec(channels=c, width=14, height=14), conv_dims=[c, c])
    cfg.train.device = "cpu"
    return cfg


def make_batch(seed=0, n=2, per_image=6):
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        xy = torch.randint(0, SIZE - 40, (per_image, 2), generator=g).float()
        wh = torch.randint(12, 40, (per_image, 2), generator=g).float()
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = torch.zeros(per_image, SIZE, SIZE, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        inst = Instances((SIZE, SIZE))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, K, (per_image,), generator=g)
        inst.gt_masks = BitMasks(masks)
        image = torch.randint(0, 256, (3, SIZE, SIZE), generator=g).float()
        batch.append({"image": image, "height": SIZE, "width": SIZE, "instances": inst})
    return batch


def build(cfg, stage_two):
    from detectron2.config import instantiate

    from disalign_det.lazy import build_stage_two_model
    from disalign_det.modeling import set_class_frequencies

    torch.manual_seed(0)
    model = build_stage_two_model(cfg) if stage_two else instantiate(cfg.model)
    for m in model.modules():
        if hasattr(m, "fed_loss_cls_weights"):  # the stage one's (image counts ** 0.5)
            m.fed_loss_cls_weights.copy_(torch.rand(K) + 0.5)
    if stage_two:
        set_class_frequencies(model, torch.randint(1, 1000, (K,), generator=torch.Generator()))
    model.train()
    return model


def trainer_for(model, batch):
    from disalign_det.engine.loop import SimpleTrainLoop

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9)
    return SimpleTrainLoop(model, itertools.repeat(batch), optimizer)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from detectron2.config import LazyConfig
    from detectron2.utils.events import EventStorage

    from disalign_det.lazy import find_project_config

    two = shrink(
        LazyConfig.load(os.path.join(ROOT, "configs/LVIS/disalign_mask_rcnn_vitdet_b_100ep.py"))
    )
    one = shrink(LazyConfig.load(find_project_config("LVIS/mask_rcnn_vitdet_b_100ep.py")))
    batch = make_batch()
    s2, s1 = build(two, True), build(one, False)
    s1.load_state_dict(s2.state_dict(), strict=False)
    t2, t1 = trainer_for(s2, batch), trainer_for(s1, batch)

    def forward():
        with torch.no_grad():
            s2(batch)

    jobs = {"s2_iter": t2.run_step, "s2_forward": forward, "s1_iter": t1.run_step}
    times = {k: [] for k in jobs}
    with EventStorage() as storage:
        for t in (t1, t2):
            t.storage = storage
        for i in range(args.warmup + args.iters):
            names = list(jobs)
            names = names[i % 3 :] + names[: i % 3]  # rotate the order from round to round
            for name in names:
                storage.iter = t1.iter = t2.iter = i
                start = time.perf_counter()
                jobs[name]()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"tiny ViTDet Mask R-CNN (sigmoid CE + federated loss), {K} classes, {SIZE} px, batch 2,")
    print(f"{args.threads} thread(s), median of {args.iters} interleaved rounds:")
    for k, v in med.items():
        print(f"  {k:10s} {1000 * v:8.1f} ms")
    ratio_fwd, ratio_s1 = med["s2_iter"] / med["s2_forward"], med["s2_iter"] / med["s1_iter"]
    print(f"  stage-two iteration / its no-grad train-mode forward: {ratio_fwd:.3f}")
    print(f"  stage-two iteration / stage-one iteration:            {ratio_s1:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
