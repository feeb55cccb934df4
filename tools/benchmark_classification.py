#!/usr/bin/env python
"""DisAlign for classification on the CPU long-tail sets, over seeds, beside the two-stage
baselines the paper compares with, all from the same stage one:

* stage one (plain cross-entropy, instance-balanced sampling);
* DisAlign (calibration only, GRW rho 1.2);
* cRT (Kang et al. 2020: the linear classifier re-trained with class-balanced sampling);
* tau-normalisation (Kang et al.: the stage one's classifier rows divided by ||w_j|| ** tau,
  tau = 1, no training).

    python tools/benchmark_classification.py [--datasets digits_lt synth_cls_lt] [--seeds 0 1 2]
        [--out output/benchmark_classification] [--quick]
    python tools/benchmark_classification.py --speed [--speed-config CONFIG] [--device cpu]

Each run goes through tools/lazyconfig_train_net.py's ``main`` with the configs of
configs/Classification-CPU (``train.seed`` = the seed). Prints top-1, many / medium / few and macro
F1 as mean ± std (min-max) over seeds, and each method's per-seed gain over stage one with the
significance rule of lab/stats.py (every seed the same sign and |mean| > std).

``--speed``: one stage-two iteration (forward with the frozen trunk, backward, SGD step) over the
no-grad forward of the same model and batch, timed alternately in one run (median of rounds).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Python puts tools/ on sys.path, not the checkout's root (where lab/, the experiment code, lives).
sys.path.append(ROOT)
CPU = os.path.join(ROOT, "configs", "Classification-CPU")
METRICS = ("top1", "many_top1", "medium_top1", "few_top1", "macro_f1")
METHODS = ("stage one", "DisAlign", "cRT", "tau-norm")
CONFIGS = {
    "digits_lt": ("digits_lt.py", "disalign_digits_lt.py", "crt_digits_lt.py"),
    "synth_cls_lt": ("synth_cls_lt.py", "disalign_synth_cls_lt.py", "crt_synth_cls_lt.py"),
}


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lazyconfig_train_net", os.path.join(ROOT, "tools", "lazyconfig_train_net.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_config(tool, config, out, opts):
    """Train (or evaluate) one config unless its metrics exist; returns the classification
    metrics."""
    metrics = os.path.join(out, "metrics_final.json")
    if not os.path.isfile(metrics):
        argv = ["--config-file", config] + opts + [f"train.output_dir={out}"]
        tool.main(tool.default_argument_parser().parse_args(argv))
    with open(metrics) as f:
        return json.load(f)["classification"]


def run_seed(tool, dataset, seed, out, quick):
    one, disalign, crt = (os.path.join(CPU, c) for c in CONFIGS[dataset])
    base = [f"train.seed={seed}"]
    if quick:
        base += ["train.max_iter=20"]
    res = {}
    d1 = os.path.join(out, dataset, f"seed{seed}", "stage_one")
    res["stage one"] = run_config(tool, one, d1, base)
    ckpt = f"train.init_checkpoint={os.path.join(d1, 'model_final.pth')}"
    res["DisAlign"] = run_config(
        tool, disalign, os.path.join(out, dataset, f"seed{seed}", "disalign"), base + [ckpt]
    )
    res["cRT"] = run_config(
        tool, crt, os.path.join(out, dataset, f"seed{seed}", "crt"), base + [ckpt]
    )
    res["tau-norm"] = run_config(
        tool,
        one,
        os.path.join(out, dataset, f"seed{seed}", "tau_norm"),
        ["--eval-only", ckpt, "model.tau_norm=1.0"],
    )
    return res


def report(all_results, seeds):
    from lab.stats import format_gain, format_stats, gain_stats, seed_stats

    lines = []
    for dataset, per_seed in all_results.items():
        lines.append(f"\n### {dataset} ({len(seeds)} seeds: {', '.join(map(str, seeds))})\n")
        lines.append("| method | " + " | ".join(METRICS) + " |")
        lines.append("|---" * (len(METRICS) + 1) + "|")
        for m in METHODS:
            cells = [format_stats(seed_stats([per_seed[s][m][k] for s in seeds])) for k in METRICS]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("\nGain over stage one (per-seed differences; n.s. = not significant):\n")
        lines.append("| method | " + " | ".join(METRICS) + " |")
        lines.append("|---" * (len(METRICS) + 1) + "|")
        for m in METHODS[1:]:
            cells = [
                format_gain(
                    gain_stats(
                        [per_seed[s][m][k] for s in seeds],
                        [per_seed[s]["stage one"][k] for s in seeds],
                    )
                )
                for k in METRICS
            ]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed(config, device, batch, size, rounds):
    """Median seconds of a stage-two iteration and of a no-grad forward, and their ratio."""
    from detectron2.config import LazyConfig, instantiate

    from disalign_det.lazy.train import prepare_stage_two

    cfg = LazyConfig.load(config)
    cfg.model.class_counts = [1 + i for i in range(cfg.model.num_classes)]
    model = instantiate(cfg.model).to(device)
    prepare_stage_two(model, cfg.disalign.freeze)
    model.train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    g = torch.Generator().manual_seed(0)
    inputs = [
        {
            "image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
            "label": i % cfg.model.num_classes,
        }
        for i in range(batch)
    ]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def step():
        loss = model(inputs)["loss_cls"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def forward():
        with torch.no_grad():
            model(inputs)

    for _ in range(2):  # warm-up
        step()
        forward()
    t_step, t_fwd = [], []
    for _ in range(rounds):
        for fn, acc in ((step, t_step), (forward, t_fwd)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            acc.append(time.perf_counter() - t0)
    s, f = statistics.median(t_step), statistics.median(t_fwd)
    return {"iteration_s": s, "no_grad_forward_s": f, "ratio": s / f}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="output/benchmark_classification")
    parser.add_argument("--quick", action="store_true", help="20 iterations (a smoke run)")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument(
        "--speed-config",
        default=os.path.join(ROOT, "configs", "ImageNet-LT", "disalign_resnext50.py"),
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="speed: images (64 GPU, 8 CPU)")
    parser.add_argument("--size", type=int, default=224, help="speed: image size")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    import disalign_det  # noqa: F401  (shims and registrations)

    if args.speed:
        batch = args.batch or (64 if args.device.startswith("cuda") else 8)
        res = speed(args.speed_config, args.device, batch, args.size, args.rounds)
        print(
            f"{os.path.relpath(args.speed_config, ROOT)} on {args.device}, batch {batch} at "
            f"{args.size} px: stage-two iteration {res['iteration_s'] * 1e3:.1f} ms, no-grad "
            f"forward {res['no_grad_forward_s'] * 1e3:.1f} ms, ratio {res['ratio']:.3f} "
            f"(median of {args.rounds} alternating rounds)"
        )
        return res
    tool = _tool()
    t0 = time.time()
    results = {}
    for dataset in args.datasets:
        results[dataset] = {s: run_seed(tool, dataset, s, args.out, args.quick) for s in args.seeds}
    text = report(results, args.seeds)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"results": results, "seconds": time.time() - t0}, f, indent=2)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write(text + "\n")
    print(f"\n{time.time() - t0:.0f} s; results in {args.out}/results.json, tables.md")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
