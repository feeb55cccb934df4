#!/usr/bin/env python
"""Training-iteration time of each stage-one classification loss against the softmax stage one,
measured in ONE run on the same machine, weights and input batch.

    python tools/benchmark_loss_speed.py [--config-set lvis|synthetic] [--iters 6] [--warmup 2]

For every loss of ``MODEL.ROI_BOX_HEAD.STAGE_ONE_LOSS`` ("eqlv2", "seesaw", "ecm", "gol"; the
sigmoid ones only on a detectron2 with the sigmoid classifier) the model is the softmax stage one
of the config set (``lvis``: configs/LVIS/mask_rcnn_R_50_FPN_2x.yaml, R50-FPN with 1203 classes)
with only the loss changed: DisAlignROIHeads without calibration, the same linear classifier, so
the ratio is what the loss itself costs. Two baselines: detectron2's own predictor ("softmax
(stock)", the ratio's denominator) and ours with the plain loss ("softmax (ours)").

Each time is detectron2's ``SimpleTrainer.run_step`` (forward, backward, optimizer step, LR 0 so
that every iteration does the same work; no data loading); all models take turns inside each
round, the median over ``--iters`` rounds is reported, as CPU time of this (one-thread) process
(``time.process_time``: on a shared, oversubscribed machine the wall time mostly measures the
other processes) and as wall time. A second, finer measurement times the classification loss
alone (forward and backward on (R, K + 1) logits of the batch's size, ``--loss-reps`` times,
interleaved) against detectron2's softmax cross-entropy: its difference over the stock iteration
is what the loss adds to an iteration. The models, batch and LR-0 setup are those
of tools/benchmark_speed.py (its helpers are reused). Goal: every ratio <= 1.10.
"""

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from disalign_det.compat.features import has_federated_loss  # noqa: E402
from tools import benchmark_speed as bs  # noqa: E402  (imports disalign_det first)

GOAL = 1.10
BASELINE = "softmax (stock)"


def loss_variants():
    """name -> config options over the config set's stage one."""
    ours = [
        "MODEL.ROI_HEADS.NAME", "DisAlignROIHeads",
        "MODEL.DISALIGN.BOX_CALIBRATION", "False",
        "MODEL.DISALIGN.CLS_LOSS", "ce",
    ]  # fmt: skip
    variants = {BASELINE: [], "softmax (ours)": ours}
    for loss in ("eqlv2", "seesaw", "ecm", "gol"):
        if loss in ("eqlv2", "ecm") and not has_federated_loss():
            continue
        variants[loss] = ours + ["MODEL.ROI_BOX_HEAD.STAGE_ONE_LOSS", loss]
    return variants


def make_cfg(config_set, opts, workdir):
    from detectron2.config import get_cfg

    from disalign_det import add_disalign_config

    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.merge_from_file(os.path.join(bs.CONFIGS, bs.CONFIG_SETS[config_set][0]))
    base = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "SOLVER.BASE_LR", "0.0"]
    base += ["DATASETS.TEST", "()"]
    if config_set == "lvis":
        base += ["DATASETS.TRAIN", f"('{bs.lvis_like_dataset(workdir)}',)"]
    cfg.merge_from_list(base + list(opts))
    cfg.freeze()
    return cfg


def loss_times(cfgs, num_rois, reps):
    """Median CPU milliseconds of forward + backward (+ state update) of each classification loss
    on the same random (num_rois, K + 1) logits and labels (a quarter foreground), interleaved."""
    from disalign_det.modeling.losses import weighted_cross_entropy
    from disalign_det.modeling.stage_one_losses import StageOneLoss

    k = cfgs[BASELINE].MODEL.ROI_HEADS.NUM_CLASSES
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(num_rois, k + 1, generator=g)
    labels = torch.full((num_rois,), k, dtype=torch.long)
    labels[: num_rois // 4] = torch.randint(0, k, (num_rois // 4,), generator=g)
    fns = {"softmax (ours)": lambda z: weighted_cross_entropy(z, labels)}
    for n, cfg in cfgs.items():
        kind = cfg.MODEL.ROI_BOX_HEAD.STAGE_ONE_LOSS
        if kind != "ce":
            module = StageOneLoss(kind, k).train()
            module.set_class_frequencies(torch.arange(1, k + 1).flip(0).float())
            fns[n] = lambda z, m=module: m(z, labels)
    out = {n: [] for n in fns}
    for r in range(reps + 2):
        for n, fn in fns.items():
            z = logits.clone().requires_grad_(True)
            cpu = time.process_time()
            fn(z).backward()
            if r >= 2:
                out[n].append((time.process_time() - cpu) * 1000)
    return {n: bs.median(v) for n, v in out.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-set", default="lvis", choices=sorted(bs.CONFIG_SETS))
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loss-reps", type=int, default=50)
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from detectron2.utils.events import EventStorage

    workdir = tempfile.mkdtemp(prefix="loss_speed_")
    variants = loss_variants()
    cfgs = {name: make_cfg(args.config_set, opts, workdir) for name, opts in variants.items()}
    state = bs.stage_one_state(cfgs[BASELINE])
    batch = bs.make_batch(args.config_set, cfgs[BASELINE].MODEL.ROI_HEADS.NUM_CLASSES)
    steps = {}
    for name, cfg in cfgs.items():
        model = bs.build_model(cfg)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(".stage_one_loss." in k for k in missing), missing
        steps[name] = bs.training_step(cfg, model.train(), batch)
    names = list(steps)
    times = {n: [] for n in names}
    with EventStorage(0):
        for r in range(args.warmup + args.iters):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                start, cpu = time.perf_counter(), time.process_time()
                steps[n].run_step()
                if r >= args.warmup:
                    times[n].append((time.process_time() - cpu, time.perf_counter() - start))
            print(f"[loss speed] round {r + 1}/{args.warmup + args.iters}", flush=True)
    cpu = {n: bs.median([c for c, _ in times[n]]) for n in names}
    wall = {n: bs.median([w for _, w in times[n]]) for n in names}
    num_rois = cfgs[BASELINE].MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE * len(batch)
    loss_ms = loss_times(cfgs, num_rois, args.loss_reps)
    rows = {}
    for n in names:
        # What this loss adds over the plain softmax cross-entropy (0 for the baselines).
        extra = loss_ms[n] - loss_ms["softmax (ours)"] if n in loss_ms else 0.0
        rows[n] = {
            "iter_cpu_s": cpu[n],
            "ratio_cpu": cpu[n] / cpu[BASELINE],
            "iter_wall_s": wall[n],
            "ratio_wall": wall[n] / wall[BASELINE],
            "loss_ms": loss_ms.get(n),
            "loss_ratio": (cpu[BASELINE] + extra / 1000) / cpu[BASELINE],
        }
    print(
        f"\nconfig set {args.config_set}, {args.iters} rounds, {args.threads} thread(s), "
        f"{num_rois} RoIs x {cfgs[BASELINE].MODEL.ROI_HEADS.NUM_CLASSES + 1} logits"
    )
    print(
        f"| stage-one loss | CPU s / it | / {BASELINE} | wall s / it | / {BASELINE} | "
        f"loss fwd+bwd ms | (stock it + extra loss ms) / stock it (goal <= {GOAL:.2f}) |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, row in rows.items():
        loss = f"{row['loss_ms']:.1f}" if row["loss_ms"] is not None else "-"
        print(
            f"| {n} | {row['iter_cpu_s']:.3f} | {row['ratio_cpu']:.3f} | "
            f"{row['iter_wall_s']:.3f} | {row['ratio_wall']:.3f} | {loss} | "
            f"{row['loss_ratio']:.4f} |"
        )
    skipped = [x for x in ("eqlv2", "ecm") if x not in rows]
    if skipped:
        print(f"not measured (no sigmoid classifier in this detectron2): {', '.join(skipped)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config_set": args.config_set, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
