#!/usr/bin/env python
"""Stage one + DisAlign stage two on the generated long-tail segmentation data over several seeds:
mIoU, mean accuracy and head / body / tail mIoU as mean ± std, and the per-seed gain of DisAlign
with the significance rule of the LVIS tables (lab.stats).

    python tools/benchmark_sem_seg.py [--out output/benchmark_sem_seg] [--seeds 0 1 2]
                                      [--stage-one-iters 1000] [--stage-two-iters 100] [--jobs 1]

Each run is a ``tools/train_net.py`` subprocess (configs/ADE20K/synthetic/, SEED = the seed; the
data is the same for every seed) writing OUT/seed<S>/{stage_one,disalign}/; a run whose
``metrics_final.json`` exists is reused. ``--jobs N`` runs N seeds at once (one thread each).
Writes OUT/benchmark.md and OUT/benchmark.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# lab/ is not installed: run as a script, Python puts tools/ on sys.path, not the checkout's root.
sys.path.append(ROOT)

from lab.stats import format_gain, format_stats, gain_stats, seed_stats  # noqa: E402

STAGE_ONE = "configs/ADE20K/synthetic/semantic_fpn_synth.yaml"
STAGE_TWO = "configs/ADE20K/synthetic/disalign_semantic_fpn_synth.yaml"
METRICS = ("mIoU", "mIoU-head", "mIoU-body", "mIoU-tail", "mACC", "mACC-tail")


def _run(config, out_dir, opts):
    metrics = os.path.join(out_dir, "metrics_final.json")
    if not os.path.isfile(metrics):
        os.makedirs(out_dir, exist_ok=True)
        cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py")]
        cmd += ["--config-file", os.path.join(ROOT, config), "OUTPUT_DIR", out_dir, *opts]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DISALIGN_QUIET_WARNINGS": "1"}
        with open(os.path.join(out_dir, "stdout.txt"), "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    with open(metrics) as f:
        return json.load(f)["sem_seg"]


def run_seed(seed, args):
    """Stage one then DisAlign from its checkpoint; returns (stage-one, DisAlign) metrics, secs."""
    t0 = time.time()
    base = os.path.join(args.out, f"seed{seed}")
    one_dir, two_dir = os.path.join(base, "stage_one"), os.path.join(base, "disalign")
    n1, n2 = args.stage_one_iters, args.stage_two_iters
    one = _run(
        STAGE_ONE,
        one_dir,
        ["SEED", str(seed), "SOLVER.MAX_ITER", str(n1), "SOLVER.STEPS", f"({int(n1 * 0.75)},)"]
        + ["SOLVER.CHECKPOINT_PERIOD", str(n1)],
    )
    two = _run(
        STAGE_TWO,
        two_dir,
        ["SEED", str(seed), "MODEL.WEIGHTS", os.path.join(one_dir, "model_final.pth")]
        + ["SOLVER.MAX_ITER", str(n2), "SOLVER.STEPS", f"({int(n2 * 0.8)},)"]
        + ["SOLVER.CHECKPOINT_PERIOD", str(n2)],
    )
    return one, two, time.time() - t0


def table(results):
    """Markdown rows: metric | stage one | DisAlign | gain (per seed, significance rule)."""
    lines = [
        "| metric | stage one | DisAlign | DisAlign - stage one |",
        "|---|---|---|---|",
    ]
    for m in METRICS:
        before = [r[0].get(m) for r in results]
        after = [r[1].get(m) for r in results]
        lines.append(
            f"| {m} | {format_stats(seed_stats(before), 2)} | {format_stats(seed_stats(after), 2)} "
            f"| {format_gain(gain_stats(after, before), 2)} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="output/benchmark_sem_seg")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stage-one-iters", type=int, default=1000)
    parser.add_argument("--stage-two-iters", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once")
    args = parser.parse_args(argv)
    args.out = os.path.abspath(args.out)
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda s: run_seed(s, args), args.seeds))
    wall = time.time() - t0
    md = (
        f"# DisAlign on sem_seg_synth_lt_val ({len(args.seeds)} seeds: {args.seeds})\n\n"
        f"Stage one {args.stage_one_iters} iterations, DisAlign stage two "
        f"{args.stage_two_iters}; mean ± std (min–max) over seeds; the gain is per seed, "
        "'n.s.' unless every seed gains with the same sign and |mean| > std.\n\n"
        + table(results)
        + f"\n\nWall time {wall / 60:.1f} min ({args.jobs} job(s)); per seed: "
        + ", ".join(f"{r[2] / 60:.1f}" for r in results)
        + " min.\n"
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmark.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "benchmark.json"), "w") as f:
        json.dump(
            {
                "seeds": args.seeds,
                "stage_one_iters": args.stage_one_iters,
                "stage_two_iters": args.stage_two_iters,
                "stage_one": [r[0] for r in results],
                "disalign": [r[1] for r in results],
                "seconds": [r[2] for r in results],
            },
            f,
            indent=1,
        )
    print(md)
    return results


if __name__ == "__main__":
    main()
