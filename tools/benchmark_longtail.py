#!/usr/bin/env python
"""Accuracy comparison on the generated LVIS-structured dataset (lvis_synth_lt_*), on CPU, in one
command.

    python tools/benchmark_longtail.py --quick    # 1 seed, 300 + 100 iterations (~9 min, estimated)
    python tools/benchmark_longtail.py            # 3 seeds, the demo's 1200 + 300 (32 min)
    python tools/benchmark_longtail.py --publish  # also copy plot + table to docs/
    python tools/benchmark_longtail.py --stage-ones softmax,rfs,cosine   # every stage one

(times on 2 idle CPU cores; the full preset runs the demo's schedules, the configs' 1200 + 300
iterations, see ``PRESETS``; --seeds, --stage-one-iters, --stage-two-iters, --posthoc-powers
override them).

Methods (box and mask AP, APr, APc, APf), for each seed (cfg.SEED):

* stage one (``--stage-ones``, default softmax): plain softmax (mask_rcnn_synth), repeat-factor
  sampling (rfs: mask_rcnn_synth_rfs), cosine classifier (cosine: mask_rcnn_synth_cosine), each
  trained ONCE per seed and shared by the methods below;
* DisAlign stage two on each stage one: box-only and box+mask (the *_cosine stage-two configs on
  the cosine stage one, the plain ones on the others);
* training-free alternatives on the same stage-one weights (evaluation only): NorCal
  (MODEL.DISALIGN.POSTHOC norcal, gamma = POSTHOC_POWER) and tau-normalisation (tau_norm; not on
  the cosine classifier, whose weight rows are already normalised).

Every run is a ``tools/train_net.py`` subprocess writing OUT/seed<S>/<stage one>/<method>/ (OUT:
--out, default output/benchmark or output/benchmark-quick); ``--jobs`` (default 2) runs side by
side with cores / jobs threads each. A run whose ``metrics_final.json`` exists is reused (an
interrupted run resumes from its last checkpoint), so re-running the command after an interruption
only does what is missing; a folder holding a run with other settings is refused. Outputs:
OUT/benchmark.md (tables, run times), OUT/benchmark.json (every number, per seed),
OUT/benchmark.png (per-class AP against the class's training instance count).

Every run is evaluated once, with Fixed AP on (TEST.LVIS_EVAL.FIXED_AP: no per-image cap, the top
K detections of each class over the test set; ``--fixed-ap-k``, default LVIS val's 10,000 per
19,809 images scaled to the test set, 101 for 200 images; 0: off) at
MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.001 (``--fixed-ap-score-thresh``), and three tables come from
its saved detections: standard AP at the configs' TEST.DETECTIONS_PER_IMAGE (100), standard AP at
an LVIS-like budget (``--budget``, default 300 * K / 1203 = 15 for the K = 60 classes) and Fixed
AP. A per-image cut of the saved detections equals running the model at that limit (see
:func:`lab.results.run_per_class_ap`). Progress: runs done / total and ETA (one redrawn line on a
terminal, plain lines otherwise). The code is the checkout's :mod:`lab` package (not installed).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The built-in datasets live under $DETECTRON2_DATASETS (default: "datasets", relative to the
# working directory); anchor it to the repository before disalign_det registers them, so that this
# process and its runs agree.
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))
# lab/ (the experiment code) is not installed: it is imported from this checkout. Run as a script,
# Python puts tools/ on sys.path, not the checkout's root, hence this one line (appended: an
# installed disalign_det still wins).
sys.path.append(ROOT)

from lab.longtail import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
