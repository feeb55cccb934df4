#!/usr/bin/env python
"""Accuracy comparison on the generated long-tail dataset (lvis_synth_*), on CPU, in one command.

    python tools/benchmark_longtail.py --quick    # 1 seed, 300 + 100 iterations (~8 min)
    python tools/benchmark_longtail.py            # 3 seeds, 700 + 200 iterations (~36 min)
    python tools/benchmark_longtail.py --publish  # also copy plot + table to docs/

(times on 2 idle CPU cores; schedules are shortened from the configs' 1500 + 300 iterations, see
``PRESETS``; --seeds, --stage-one-iters, --stage-two-iters, --posthoc-powers override them).

Methods (box and mask AP, APr, APc, APf), for each seed (cfg.SEED):

* stage one: plain softmax (mask_rcnn_synth), repeat-factor sampling (mask_rcnn_synth_rfs), cosine
  classifier (mask_rcnn_synth_cosine), each trained ONCE per seed and shared by the methods below;
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

Every run is evaluated twice: at the configs' TEST.DETECTIONS_PER_IMAGE (100), and at an LVIS-like
budget (``--budget``, default 300 * K / 1203 = 5 for the K = 20 generated classes) from the same
saved detections, which equals running the model at that limit (see
:func:`disalign_det.benchmarks.results.run_per_class_ap`). Progress: runs done / total and ETA (one
redrawn line on a terminal, plain lines otherwise). The code is :mod:`disalign_det.benchmarks`.
"""

import os
import sys

# The built-in datasets live under $DETECTRON2_DATASETS (default: "datasets", relative to the
# working directory); anchor it to the repository before disalign_det registers them, so that this
# process and its runs agree.
os.environ.setdefault(
    "DETECTRON2_DATASETS",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datasets"),
)

from disalign_det.benchmarks.longtail import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
