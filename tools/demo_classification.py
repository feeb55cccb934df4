"""The classification demo (``tools/demo.py --classification-digits``): stage one and DisAlign
stage two on the long-tailed handwritten digits (scikit-learn's real images, 150 -> 3 training
images per class), each a run of tools/lazyconfig_train_net.py; about a minute on one core.
Prints top-1, many / medium / few (> 50 / 10-50 / < 10 training images) and macro F1."""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = (
    ("stage one", "configs/Classification-CPU/digits_lt.py", "digits_stage1"),
    (
        "+ DisAlign (stage two)",
        "configs/Classification-CPU/disalign_digits_lt.py",
        "digits_disalign",
    ),
)
COLUMNS = ("top1", "many_top1", "medium_top1", "few_top1", "macro_f1")


def run_digits(out, quick=False):
    rows = []
    checkpoint = None
    for name, config, sub in STAGES:
        out_dir = os.path.join(out, sub)
        metrics = os.path.join(out_dir, "metrics_final.json")
        opts = [f"train.output_dir={out_dir}"]
        if checkpoint:
            opts.append(f"train.init_checkpoint={checkpoint}")
        if quick:
            opts.append("train.max_iter=30")
        if os.path.isfile(metrics):
            print(f"[demo] {name}: reusing {metrics}")
        else:
            cmd = [sys.executable, os.path.join(ROOT, "tools", "lazyconfig_train_net.py")]
            cmd += ["--config-file", os.path.join(ROOT, config), *opts]
            os.makedirs(out_dir, exist_ok=True)
            print(f"[demo] {name}: {' '.join(cmd)}", flush=True)
            start = time.time()
            with open(os.path.join(out_dir, "stdout.txt"), "w") as log:
                code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
            if code != 0:
                raise SystemExit(f"[demo] {name} failed (exit {code}); see {out_dir}/stdout.txt")
            print(f"[demo] {name}: done in {time.time() - start:.0f} s", flush=True)
        with open(metrics) as f:
            rows.append((name, json.load(f)["classification"]))
        checkpoint = os.path.join(out_dir, "model_final.pth")
    print("\nLong-tailed digits (digits_lt_test, 20 images per class), top-1 accuracy in %:\n")
    print("| model | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, m in rows:
        print(f"| {name} | " + " | ".join(f"{m[c]:.1f}" for c in COLUMNS) + " |")
    return 0
