#!/usr/bin/env python
"""The README's main job: stage one Mask R-CNN on the generated long-tail LVIS-format dataset, then
DisAlign stage two from its checkpoint; prints both LVIS metric tables and the comparison.

    python tools/demo.py [--out output/demo] [--quick]

Each stage runs ``tools/train_net.py`` in its own process (its log is OUT/<stage>/log.txt); a
stage whose ``metrics_final.json`` already exists is reused, so a re-run is cheap.
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from disalign_det.report import load_metrics, metrics_table  # noqa: E402

STAGE_ONE = "configs/LVIS/synthetic/mask_rcnn_synth.yaml"
STAGE_TWO = "configs/LVIS/synthetic/disalign_synth.yaml"


def run_stage(name, config, out_dir, opts):
    metrics = os.path.join(out_dir, "metrics_final.json")
    if os.path.isfile(metrics):
        print(f"[demo] {name}: reusing {metrics}")
        return load_metrics(metrics)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "train_net.py"),
        "--config-file",
        os.path.join(ROOT, config),
        "OUTPUT_DIR",
        out_dir,
        *opts,
    ]
    print(f"[demo] {name}: {' '.join(cmd)}", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    with open(os.path.join(out_dir, "stdout.txt"), "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"[demo] {name} failed (exit {proc.returncode}); see {out_dir}/stdout.txt")
    print(f"[demo] {name}: done in {time.time() - start:.0f} s", flush=True)
    return load_metrics(metrics)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "output", "demo"))
    parser.add_argument(
        "--quick", action="store_true", help="short schedules (a smoke run, not a result)"
    )
    args = parser.parse_args(argv)
    one_opts, two_opts = [], []
    if args.quick:
        one_opts = ["SOLVER.MAX_ITER", "300", "SOLVER.STEPS", "(250,)"]
        two_opts = ["SOLVER.MAX_ITER", "60", "SOLVER.STEPS", "(50,)"]
    s1_dir = os.path.join(args.out, "stage1")
    s1 = run_stage("stage one (Mask R-CNN)", STAGE_ONE, s1_dir, one_opts)
    weights = os.path.join(s1_dir, "model_final.pth")
    s2 = run_stage(
        "stage two (DisAlign)",
        STAGE_TWO,
        os.path.join(args.out, "disalign"),
        ["MODEL.WEIGHTS", weights, *two_opts],
    )
    print("\nLVIS metrics on lvis_synth_val (generated data, CPU schedule):\n")
    print(metrics_table([("Mask R-CNN (stage one)", s1), ("+ DisAlign (stage two)", s2)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
