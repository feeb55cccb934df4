"""The long-tail benchmark from the plan to the written outputs, and its command line
(``tools/benchmark_longtail.py``, whose docstring documents it)."""

import argparse
import copy
import logging
import os
import shutil
import time
from dataclasses import replace
from typing import Callable, Optional, Sequence

from .outputs import write_outputs
from .plan import (
    CLASSIC_STAGE_ONES,
    METHODS,
    PRESETS,
    REPO_ROOT,
    SIGMOID_STAGE_ONES,
    STAGE_ONES,
    TASKS,
    Preset,
    Run,
    build_plan,
)
from .progress import Progress
from .results import (
    budget_metrics,
    dataset_info,
    fixed_ap_metrics,
    lvis_like_budget,
    lvis_like_fixed_ap_k,
    per_class_means,
    summarise,
)
from .run import SubprocessRunner, run_scheduled

__all__ = ["main", "parse_args", "preset_from_args", "run_benchmark"]

logger = logging.getLogger(__name__)

# Without a per-image cap every detection above the score threshold is kept, and detectron2 pastes
# masks one at a time on CPU: at the configs' 0.0001 the demo's stage one returns ~840 detections
# per image (an evaluation-only run took 211 s, against 18 s at 15 per image); at 0.001, ~320 per
# image. The detections Fixed AP keeps (each class's top K = 101) all scored above 0.002 in that
# run, so 0.001 drops none of them there, and the top 100 / 15 per image of the standard and budget
# tables lie above it whenever an image has that many above 0.001. Measured and documented in
# docs/eval_backends.md; --fixed-ap-score-thresh -1 keeps the configs' threshold.
FIXED_AP_SCORE_THRESH = 0.001


def run_benchmark(
    preset: Preset,
    out: str,
    *,
    stage_ones: Sequence[str] = CLASSIC_STAGE_ONES,
    jobs: int = 2,
    runner: Optional[Callable[[Run], int]] = None,
    plot_task: str = "segm",
    publish_dir: Optional[str] = None,
    dry_run: bool = False,
    log: Optional[Callable[[str], None]] = None,
    budget: Optional[int] = None,
    fixed_ap_k: Optional[int] = None,
    fixed_ap_score_thresh: Optional[float] = FIXED_AP_SCORE_THRESH,
) -> dict:
    """Run (or reuse) every run of ``preset`` and write the table, JSON and plot into ``out``.

    ``budget``: detections per image of the second evaluation (None: :func:`lvis_like_budget` of
    the number of classes; 0: none). ``fixed_ap_k``: Fixed AP's detections per class (None:
    :func:`lvis_like_fixed_ap_k` of the number of test images; 0: no Fixed AP). With Fixed AP, every
    run is evaluated without a per-image cap (TEST.LVIS_EVAL.FIXED_AP True) and the standard tables
    come from its saved detections cut to the runs' TEST.DETECTIONS_PER_IMAGE per image, which is
    what the model returns with that cap (detectron2 cuts after its per-class NMS).
    ``fixed_ap_score_thresh``: MODEL.ROI_HEADS.SCORE_THRESH_TEST of every run with Fixed AP (None:
    the configs', 0.0001); see :data:`FIXED_AP_SCORE_THRESH`.
    Returns a dict with ``rows``, ``budget`` (None or ``{"dets_per_image", "rows"}``),
    ``fixed_ap`` (None or ``{"dets_per_class", "rows"}``), ``runs``, ``paths`` (md, json, png) and
    ``wall_s``.
    """
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    progress = None
    out = os.path.abspath(out)
    jobs = max(1, int(jobs))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    info = dataset_info(preset.extra_opts)
    if fixed_ap_k is None:
        fixed_ap_k = lvis_like_fixed_ap_k(info.num_test_images)
    eval_opts = []
    if fixed_ap_k:
        eval_opts = [
            "TEST.LVIS_EVAL.FIXED_AP", "True",
            "TEST.LVIS_EVAL.FIXED_AP_DETS_PER_CLASS", str(int(fixed_ap_k)),
            # Explicit: the runs' own cap (info.max_dets) may be one apply_fixed_ap_config refuses.
            "TEST.DETECTIONS_PER_IMAGE", "-1",
        ]  # fmt: skip
        if fixed_ap_score_thresh is not None:
            eval_opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", repr(float(fixed_ap_score_thresh))]
    chains = build_plan(preset, out, stage_ones, eval_opts)
    runs = [r for c in chains for r in c]
    if log is None:
        # Console output: log lines plus runs done / total and ETA (redrawn on a terminal).
        progress = Progress(len(runs))
        log = progress.log
    if dry_run:
        for r in runs:
            print("python tools/train_net.py " + " ".join(r.command_args()))
        return {"runs": runs, "rows": [], "budget": None, "fixed_ap": None, "paths": {},
                "wall_s": 0.0}  # fmt: skip
    if preset.name == "quick":
        log("QUICK preset: 1 seed and short schedules; a smoke run, not a result.")
    log(
        f"{len(runs)} runs ({len(chains)} stage ones), {jobs} at a time "
        f"({threads} thread(s) each), results under {out}"
    )
    os.makedirs(out, exist_ok=True)
    run_scheduled(chains, runner or SubprocessRunner(threads), jobs, log, progress)

    if fixed_ap_k:
        # metrics_final.json's standard AP is then at the LVIS default of 300 per image: the
        # tables use the runs' own cap, from the saved (uncapped) detections.
        standard = {r.key: budget_metrics(r, info, info.max_dets) for r in runs}
        rows = summarise(runs, preset, stage_ones, metrics_of=lambda r: standard[r.key])
        fixed_rows = summarise(runs, preset, stage_ones, metrics_of=fixed_ap_metrics)
        fixed_res = {"dets_per_class": int(fixed_ap_k), "rows": fixed_rows}
    else:
        rows = summarise(runs, preset, stage_ones)
        fixed_res = None
    per_class = per_class_means(runs, info, plot_task, stage_ones)
    if budget is None:
        budget = lvis_like_budget(len(info.class_names))
    budget_res = None
    if 0 < budget < info.max_dets:
        t0 = time.perf_counter()
        at_budget = {r.key: budget_metrics(r, info, budget) for r in runs}
        rows_b = summarise(runs, preset, stage_ones, metrics_of=lambda r: at_budget[r.key])
        budget_res = {"dets_per_image": budget, "rows": rows_b}
        log(f"evaluation at {budget} detections per image: {time.perf_counter() - t0:.0f} s")
    elif budget:
        log(f"no budget evaluation: {budget} >= TEST.DETECTIONS_PER_IMAGE {info.max_dets}")
    wall_s = time.perf_counter() - start
    load = (load_start, os.getloadavg()[0])
    paths = write_outputs(
        out, preset, stage_ones, runs, rows, per_class, info, plot_task, wall_s, jobs, threads,
        load, budget=budget_res, fixed_ap=fixed_res,
    )  # fmt: skip
    paths = dict(zip(("md", "json", "png"), paths))
    if publish_dir:
        os.makedirs(publish_dir, exist_ok=True)
        for kind in ("md", "png"):
            dst = os.path.join(publish_dir, f"benchmark.{kind}")
            shutil.copyfile(paths[kind], dst)
            paths[f"published_{kind}"] = dst
    return {"rows": rows, "budget": budget_res, "fixed_ap": fixed_res, "runs": runs, "paths": paths,
            "wall_s": wall_s}  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Accuracy comparison on the generated long-tail dataset (lvis_synth_*), on "
        "CPU, in one command (tools/benchmark_longtail.py documents it).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default output/benchmark, output/benchmark-quick with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 seed, short schedules: about 9 min on 2 idle cores (estimated; a smoke run)",
    )
    parser.add_argument("--seeds", type=str, default=None, help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--stage-one-iters", type=int, default=None)
    parser.add_argument("--stage-two-iters", type=int, default=None)
    parser.add_argument(
        "--posthoc-powers",
        type=str,
        default=None,
        help="comma-separated gamma/tau values, each reported (default 1)",
    )
    parser.add_argument(
        "--stage-ones",
        type=str,
        default=None,
        help=f"comma-separated subset of {','.join(STAGE_ONES)}, or 'all' (the full grid; "
        "eqlv2/ecm need detectron2 main) (default: the preset's, softmax)",
    )
    parser.add_argument(
        "--methods",
        type=str,
        default=None,
        help=f"comma-separated subset of {','.join(METHODS)} run on each stage one (which is "
        "always run); default: all",
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="runs side by side (each with cores / jobs threads)"
    )
    parser.add_argument(
        "--plot-task",
        choices=TASKS,
        default="segm",
        help="AP of the per-class plot: segm (mask, default) or bbox",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="copy the plot and the table to docs/benchmark.{png,md}",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help="also evaluate every run at this many detections per image (default: LVIS's 300 "
        "per 1203 classes scaled to the dataset, 15 for 60 classes; 0: off)",
    )
    parser.add_argument(
        "--fixed-ap-k",
        type=int,
        default=None,
        help="Fixed AP's detections per class over the test set (default: LVIS val's 10,000 per "
        "19,809 images scaled to the test set, 101 for 200 images; 0: no Fixed AP)",
    )
    parser.add_argument(
        "--fixed-ap-score-thresh",
        type=float,
        default=FIXED_AP_SCORE_THRESH,
        help="MODEL.ROI_HEADS.SCORE_THRESH_TEST of the runs with Fixed AP (default %(default)s; "
        "negative: the configs' own, 0.0001: ~840 instead of ~320 detections per image to "
        "evaluate on the demo's stage one)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config options appended to every run (KEY VALUE ...)",
    )
    return parser.parse_args(argv)


def _available_stage_ones():
    """Every stage one this detectron2 can train (v0.6 lacks the sigmoid classifier)."""
    from disalign_det.compat.features import has_federated_loss

    if has_federated_loss():
        return list(STAGE_ONES)
    print(f"--stage-ones all: {', '.join(SIGMOID_STAGE_ONES)} left out (no sigmoid classifier)")
    return [s for s in STAGE_ONES if s not in SIGMOID_STAGE_ONES]


def preset_from_args(args) -> Preset:
    preset = copy.deepcopy(PRESETS["quick" if args.quick else "full"])
    if args.seeds:
        preset = replace(preset, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.stage_one_iters:
        preset = replace(preset, stage_one_iters=args.stage_one_iters)
    if args.stage_two_iters:
        preset = replace(preset, stage_two_iters=args.stage_two_iters)
    if args.posthoc_powers:
        preset = replace(
            preset, posthoc_powers=tuple(float(p) for p in args.posthoc_powers.split(","))
        )
    if args.methods:
        methods = tuple(m for m in args.methods.split(",") if m)
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"unknown --methods {unknown}; choose from {list(METHODS)}")
        preset = replace(preset, methods=methods)
    if args.opts:
        preset = replace(preset, extra_opts=tuple(args.opts))
    return preset


def main(argv=None, runner=None) -> int:
    args = parse_args(argv)
    preset = preset_from_args(args)
    if args.out is None:
        args.out = os.path.join(
            REPO_ROOT, "output", "benchmark-quick" if args.quick else "benchmark"
        )
    stage_ones = (
        [s for s in args.stage_ones.split(",") if s] if args.stage_ones else list(preset.stage_ones)
    )
    if stage_ones == ["all"]:
        stage_ones = _available_stage_ones()
    unknown = [s for s in stage_ones if s not in STAGE_ONES]
    if unknown:
        raise SystemExit(f"unknown --stage-ones {unknown}; choose from {list(STAGE_ONES)}")
    res = run_benchmark(
        preset,
        args.out,
        stage_ones=stage_ones,
        jobs=args.jobs,
        runner=runner,
        plot_task=args.plot_task,
        publish_dir=os.path.join(REPO_ROOT, "docs") if args.publish else None,
        dry_run=args.dry_run,
        budget=args.budget,
        fixed_ap_k=args.fixed_ap_k,
        fixed_ap_score_thresh=(
            None if args.fixed_ap_score_thresh < 0 else args.fixed_ap_score_thresh
        ),
    )
    if args.dry_run:
        return 0
    with open(res["paths"]["md"]) as f:
        print("\n" + f.read())
    print(f"[benchmark] total wall time: {res['wall_s'] / 60:.1f} min ({res['wall_s']:.0f} s)")
    for kind, path in res["paths"].items():
        print(f"[benchmark] {kind}: {path}")
    print(f"[benchmark] per-run folders (logs, checkpoints, results): {os.path.abspath(args.out)}")
    bad = [r for r in res["runs"] if r.status in ("failed", "skipped")]
    if bad:
        print(
            f"[benchmark] {len(bad)} run(s) failed or were skipped: "
            f"{', '.join(r.key for r in bad)}"
        )
        return 1
    return 0
