#!/usr/bin/env python
"""Peak memory and time of LVIS evaluation at LVIS scale: detectron2's LVISEvaluator vs ours.

Generates a synthetic LVIS v1-like ground truth (1203 categories with the real r/c/f split, ~12
polygon annotations per image, negative and not-exhaustive category lists) and, per image, 300
detections as detectron2 ``Instances`` with full-image masks (640x480 by default), then runs each
evaluator path in its own subprocess:

* ``stock``: ``detectron2.evaluation.LVISEvaluator`` (process() per image, then evaluate());
* ``ours``: ``disalign_det.evaluation.StreamingLVISEvaluator`` (LVIS API, the default backend);
* ``fast``: the same evaluator with ``backend="fast"`` (``TEST.LVIS_EVAL.BACKEND``, evaluation
  on arrays straight from the shards, bit-identical) and ``lvis_instances_results.json`` written
  by a child process meanwhile (``TEST.LVIS_EVAL.BACKGROUND_RESULTS_JSON``, the config default);
* ``fast-inline``: ``fast`` with the json written in-process (one core's worth of work);
* ``faster``: the same evaluator with ``backend="faster_coco_eval"``.

``ours`` is the streaming evaluator as it was before the fast backend and the background json
(``BACKEND lvis``, ``BACKGROUND_RESULTS_JSON False``): the reference for the speed-ups. The
metrics of every other path are compared with those of ``ours``: "identical" or the largest
absolute difference, per size.

Each worker reports, per stage, wall time and peak RSS of the worker process (Linux ``VmHWM``,
reset with ``/proc/self/clear_refs`` at every stage start, so each stage's peak is its own):
``init`` (loading the GT), ``collect`` (the process() calls only; generating the fake model output
is excluded from the time), ``gather+write`` (from evaluate() to the first evaluation: gather,
result files), ``bbox`` and ``segm`` (one LVIS evaluation each, including building its inputs).
CPU time includes finished child processes (``fast``'s json writer; it is reaped at the end of
the last stage, so its CPU lands there), and the child's peak RSS is reported separately.
With ``--share-collect`` (default) the streaming paths of one size evaluate copies of the same
shard file, collected once (``process()`` is the same code for all of them; its time and peak
are those of that one run).

Sizes that cannot run here are extrapolated with a least-squares line through the measured sizes.

Examples::

    python tools/benchmark_lvis_eval.py --sizes 200,500,1000
    python tools/benchmark_lvis_eval.py --sizes 19809 --paths ours --timeout 3600
    python tools/benchmark_lvis_eval.py --sizes 100,200,400 --paths ours,faster
"""

import disalign_det  # isort:skip  (a real _C or the stand-in, before detectron2 / lvis)

import argparse
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pycocotools.mask as mask_utils
import torch

from disalign_det.utils.memory import current_rss_mb, peak_rss_mb, reset_peak_rss

logger = logging.getLogger("benchmark_lvis_eval")

LVIS_VAL_IMAGES = 19809
NUM_CATEGORIES = 1203
# LVIS v1 has 337 rare, 461 common and 405 frequent categories.
FREQUENCY_SPLIT = (("r", 337), ("c", 461), ("f", 405))
# Relative chance that an image contains a category of each group (long tail).
GROUP_WEIGHT = {"r": 1.0, "c": 4.0, "f": 20.0}
NUM_TEMPLATES = 16
STAGES = ("init", "collect", "gather+write", "bbox", "segm")
PATHS = ("stock", "ours", "fast", "fast-inline", "faster")
# Streaming paths: (TEST.LVIS_EVAL.BACKEND, BACKGROUND_RESULTS_JSON).
STREAMING = {
    "ours": ("lvis", False),
    "fast": ("fast", True),
    "fast-inline": ("fast", False),
    "faster": ("faster_coco_eval", False),
}


# ---------------------------------------------------------------------------- synthetic data
def _ellipse_polygon(x, y, w, h, vertices=16):
    angles = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    cx, cy = x + w / 2, y + h / 2
    return np.stack([cx + w / 2 * np.cos(angles), cy + h / 2 * np.sin(angles)], 1).ravel().tolist()


def _ellipse_patch(x, y, w, h, height, width):
    """The filled ellipse inscribed in a box, as (top, left, bool array) for pasting."""
    x0, y0 = int(x), int(y)
    x1, y1 = min(int(math.ceil(x + w)), width), min(int(math.ceil(y + h)), height)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    inside = ((xx + 0.5 - x - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - y - h / 2) / (h / 2)) ** 2 <= 1
    return y0, x0, inside


def _log_uniform(rng, low, high, size):
    return np.exp(rng.uniform(np.log(low), np.log(high), size))


def make_templates(seed, height, width, dets_per_image):
    """Geometry shared by images ``i % NUM_TEMPLATES``: GT ellipses and detection mask patches.

    Rendering 300 ellipses per image from scratch would dominate the run time; a pool of layouts
    keeps the benchmark about evaluation, while every image has its own id, classes and scores.
    """
    rng = np.random.default_rng([seed, 1])
    templates = []
    for _ in range(NUM_TEMPLATES):
        num_gt = int(np.clip(rng.poisson(11) + 1, 1, 40))
        gw = _log_uniform(rng, 6, 0.8 * width, num_gt).astype(int)
        gh = _log_uniform(rng, 6, 0.8 * height, num_gt).astype(int)
        gx = (rng.random(num_gt) * (width - gw)).astype(int)
        gy = (rng.random(num_gt) * (height - gh)).astype(int)
        gt_polys = [_ellipse_polygon(*b) for b in zip(gx, gy, gw, gh)]
        gt_areas = [
            float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([p], height, width))))
            for p in gt_polys
        ]

        # 3 detections around each GT object (jittered), the rest anywhere.
        num_near = min(3 * num_gt, dets_per_image)
        near_gt = np.full(dets_per_image, -1)
        near_gt[:num_near] = np.arange(num_near) % num_gt
        w = _log_uniform(rng, 6, 0.8 * width, dets_per_image)
        h = _log_uniform(rng, 6, 0.8 * height, dets_per_image)
        x = rng.random(dets_per_image) * (width - w)
        y = rng.random(dets_per_image) * (height - h)
        idx = near_gt[:num_near]
        jitter = rng.normal(1.0, 0.1, (4, num_near))
        w[:num_near] = np.minimum(gw[idx] * jitter[0], width - 1)
        h[:num_near] = np.minimum(gh[idx] * jitter[1], height - 1)
        x[:num_near] = np.clip(gx[idx] + gw[idx] * (jitter[2] - 1), 0, width - w[:num_near])
        y[:num_near] = np.clip(gy[idx] + gh[idx] * (jitter[3] - 1), 0, height - h[:num_near])
        patches = [_ellipse_patch(*b, height, width) for b in zip(x, y, w, h)]
        templates.append(
            {
                "gt_boxes": np.stack([gx, gy, gw, gh], 1).tolist(),
                "gt_polys": gt_polys,
                "gt_areas": gt_areas,
                "pred_boxes": np.stack([x, y, x + w, y + h], 1).astype(np.float32),
                "pred_patches": patches,
                "near_gt": near_gt,
            }
        )
    return templates


def category_frequencies(seed):
    """Category id -> r/c/f, groups spread over the ids like LVIS's alphabetical order."""
    rng = np.random.default_rng([seed, 2])
    freqs = [f for f, n in FREQUENCY_SPLIT for _ in range(n)]
    rng.shuffle(freqs)
    return {i + 1: f for i, f in enumerate(freqs)}


def image_labels(seed, image_id, template, freqs):
    """Per-image categories: GT categories, negative and not-exhaustive lists."""
    rng = np.random.default_rng([seed, 3, image_id])
    cat_ids = np.arange(1, NUM_CATEGORIES + 1)
    weights = np.array([GROUP_WEIGHT[freqs[c]] for c in cat_ids])
    num_pos = int(np.clip(1 + rng.poisson(2), 1, len(template["gt_boxes"])))
    pos = rng.choice(cat_ids, size=num_pos, replace=False, p=weights / weights.sum())
    gt_cats = [int(c) for c in rng.choice(pos, size=len(template["gt_boxes"]))]
    absent = np.setdiff1d(cat_ids, pos)
    neg = sorted(int(c) for c in rng.choice(absent, size=1 + rng.poisson(4), replace=False))
    not_exhaustive = [int(pos[0])] if rng.random() < 0.25 else []
    return gt_cats, neg, not_exhaustive


def write_ground_truth(path, num_images, seed, height, width, templates):
    freqs = category_frequencies(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        template = templates[image_id % NUM_TEMPLATES]
        gt_cats, neg, not_exhaustive = image_labels(seed, image_id, template, freqs)
        images.append(
            {
                "id": image_id,
                "height": height,
                "width": width,
                "coco_url": f"http://images.cocodataset.org/val2017/{image_id:012d}.jpg",
                "neg_category_ids": neg,
                "not_exhaustive_category_ids": not_exhaustive,
            }
        )
        for box, poly, area, cat in zip(
            template["gt_boxes"], template["gt_polys"], template["gt_areas"], gt_cats
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [float(v) for v in box],
                    "area": area,
                    "segmentation": [poly],
                }
            )
    categories = [
        {"id": c, "name": f"category_{c}", "synset": f"c{c}.n.01", "frequency": f}
        for c, f in freqs.items()
    ]
    gt = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    gt["categories"] = categories
    with open(path, "w") as f:
        json.dump(gt, f)
    return len(annotations)


def model_output(seed, image_id, template, freqs, height, width):
    """The ``Instances`` a Mask R-CNN would return for this image (0-based classes)."""
    from detectron2.structures import Boxes, Instances

    gt_cats, neg, _ = image_labels(seed, image_id, template, freqs)
    rng = np.random.default_rng([seed, 4, image_id])
    near = template["near_gt"]
    n = len(near)
    # Detections near a GT object: mostly its class; the rest: 15% negative classes (evaluated as
    # false positives), 85% any class (mostly unverified for the image, so ignored by LVIS eval).
    classes = rng.integers(1, NUM_CATEGORIES + 1, n)
    near_idx = np.nonzero(near >= 0)[0]
    own = rng.random(len(near_idx)) < 0.7
    classes[near_idx[own]] = np.array(gt_cats)[near[near_idx[own]]]
    far_idx = np.nonzero(near < 0)[0]
    neg_pick = far_idx[rng.random(len(far_idx)) < 0.15]
    classes[neg_pick] = rng.choice(neg, size=len(neg_pick))
    scores = rng.random(n).astype(np.float32)
    order = np.argsort(-scores, kind="stable")  # a detector returns them sorted by score
    # Like a Mask R-CNN's pasted masks: one C-contiguous (N, H, W) bool array at image size.
    masks = np.zeros((n, height, width), dtype=bool)
    for i, k in enumerate(order):
        top, left, patch = template["pred_patches"][k]
        masks[i, top : top + patch.shape[0], left : left + patch.shape[1]] = patch
    return Instances(
        (height, width),
        pred_boxes=Boxes(torch.from_numpy(template["pred_boxes"][order])),
        scores=torch.from_numpy(scores[order]),
        pred_classes=torch.from_numpy(classes[order] - 1),
        pred_masks=torch.from_numpy(masks),
    )


# ---------------------------------------------------------------------------- measurement
def _cpu_with_children():
    """CPU seconds of this process plus its finished (reaped) children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class StageRecorder:
    """Wall time, CPU time (all threads of the process) and peak RSS of consecutive stages.

    CPU time is the robust measure on a shared machine, where wall time includes waiting for a
    core.
    """

    def __init__(self):
        self.stages = {}
        self._name = None
        self._start = None
        self._cpu_start = None

    def _stage(self, name):
        return self.stages.setdefault(name, {"time_s": 0.0, "cpu_s": 0.0, "peak_mb": 0.0})

    def start(self, name):
        self.stop()
        self._name = name
        reset_peak_rss()  # not resettable: stage peaks become running maxima
        self._start = time.perf_counter()
        self._cpu_start = _cpu_with_children()

    def add_time(self, name, seconds, cpu_seconds=0.0):
        stage = self._stage(name)
        stage["time_s"] += seconds
        stage["cpu_s"] += cpu_seconds

    def stop(self):
        if self._name is None:
            return
        stage = self._stage(self._name)
        stage["time_s"] += time.perf_counter() - self._start
        stage["cpu_s"] += _cpu_with_children() - self._cpu_start
        stage["peak_mb"] = max(stage["peak_mb"], peak_rss_mb())
        self._name = None


def _instrument(path, recorder):
    """Start the 'bbox'/'segm' stages where each path begins an LVIS evaluation."""
    if path == "stock":
        from detectron2.evaluation import lvis_evaluation as module

        original = module._evaluate_predictions_on_lvis

        def wrapped(lvis_gt, lvis_results, iou_type, *args, **kwargs):
            # Stock path: the segm pass's deep copy happens inside this function, counted here.
            recorder.start(iou_type)
            return original(lvis_gt, lvis_results, iou_type, *args, **kwargs)

        module._evaluate_predictions_on_lvis = wrapped
    else:
        from disalign_det.evaluation.lvis_evaluation import StreamingLVISEvaluator as cls

        original = cls.evaluate_task

        def wrapped(self, task, paths):
            recorder.start(task)  # includes loading this task's fields from the shards
            return original(self, task, paths)

        cls.evaluate_task = wrapped


def _record_child_peaks():
    """Peak RSS (MB) of each background json writer, appended to the returned list on wait."""
    from disalign_det.evaluation.shards import BackgroundResultsWriter

    peaks, original = [], BackgroundResultsWriter.wait

    def wait(self):
        original(self)
        peaks.append(self.peak_mb)

    BackgroundResultsWriter.wait = wait
    return peaks


def run_worker(args):
    """One path, one size, in this process; writes a JSON report to ``args.report``."""
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import LVISEvaluator

    from disalign_det.compat.features import lvis_evaluator_takes_max_dets
    from disalign_det.evaluation import StreamingLVISEvaluator

    torch.set_num_threads(1)
    height, width = args.height, args.width
    templates = make_templates(args.seed, height, width, args.dets)
    freqs = category_frequencies(args.seed)
    name = "benchmark_lvis_synthetic"
    MetadataCatalog.get(name).set(json_file=args.gt)

    recorder = StageRecorder()
    _instrument(args.worker, recorder)
    child_peaks = _record_child_peaks()
    kwargs = {"max_dets_per_image": args.dets} if lvis_evaluator_takes_max_dets() else {}
    output_dir = args.output_dir or None
    # Interpreter + torch + detectron2 + the template pool: the same for both paths.
    baseline_mb = current_rss_mb()
    recorder.start("init")
    if args.worker == "stock":
        evaluator = LVISEvaluator(name, distributed=False, output_dir=output_dir, **kwargs)
    else:
        backend, background = STREAMING[args.worker]
        evaluator = StreamingLVISEvaluator(
            name,
            distributed=False,
            output_dir=output_dir,
            max_dets_per_image=args.dets,
            backend=backend,
            background_results_json=background,
        )
    evaluator.reset()

    cache = None
    if args.shard_cache and args.worker != "stock":
        cache = os.path.join(args.shard_cache, f"shard_{args.images}")
    if cache and os.path.exists(cache + ".json"):
        # Collected by an earlier path of this size: evaluate a copy of the same shard.
        with open(cache + ".json") as f:
            cached = json.load(f)
        info = dict(cached["info"], path=os.path.join(args.shard_cache, f"copy_{args.worker}"))
        shutil.copyfile(cache + ".lvisdet", info["path"])
        recorder.stages["collect"] = cached["collect"]
        generate_s = 0.0
        recorder.start("gather+write")
        results = evaluator.evaluate_shards([info])
    else:
        recorder.start("collect")
        generate_s = generate_cpu_s = 0.0
        for image_id in range(1, args.images + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            output = model_output(
                args.seed, image_id, templates[image_id % NUM_TEMPLATES], freqs, height, width
            )
            generate_s += time.perf_counter() - t0
            generate_cpu_s += time.process_time() - c0
            evaluator.process([{"image_id": image_id}], [{"instances": output}])
            del output
        recorder.add_time("collect", -generate_s, -generate_cpu_s)
        recorder.start("gather+write")
        if cache:
            recorder.stop()  # the copy below is the benchmark's, not the evaluator's
            info = evaluator.close_shard()
            shutil.copyfile(info["path"], cache + ".lvisdet")
            with open(cache + ".json", "w") as f:
                json.dump({"info": info, "collect": recorder.stages["collect"]}, f)
            recorder.start("gather+write")
            results = evaluator.evaluate_shards([info])
        else:
            results = evaluator.evaluate()
    recorder.stop()

    report = {
        "path": args.worker,
        "images": args.images,
        "detections": args.images * args.dets,
        "stages": recorder.stages,
        "generate_s": generate_s,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "baseline_mb": baseline_mb,
        "child_peak_mb": child_peaks[0] if child_peaks else None,
        "metrics": results,
    }
    with open(args.report, "w") as f:
        json.dump(report, f)


# ---------------------------------------------------------------------------- driver
def _run_one(args, path, size, gt_path, workdir):
    report = os.path.join(workdir, f"{path}_{size}.json")
    output_dir = "" if args.no_output_dir else os.path.join(workdir, f"out_{path}_{size}")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--gt", gt_path]
    cmd += ["--images", str(size), "--dets", str(args.dets), "--seed", str(args.seed)]
    cmd += ["--height", str(args.height), "--width", str(args.width), "--report", report]
    cmd += ["--output-dir", output_dir]
    if args.share_collect:
        cache = os.path.join(workdir, "shards")
        os.makedirs(cache, exist_ok=True)
        cmd += ["--shard-cache", cache]
    t0 = time.perf_counter()
    try:
        # "timeout" also kills the worker if this driver dies; the Python timeout is the backstop.
        proc = subprocess.run(
            ["timeout", "-s", "KILL", str(args.timeout)] + cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=args.timeout + 30,
        )
        failed = proc.returncode != 0
        reason = f"exit {proc.returncode}" + (" (timeout)" if proc.returncode == -9 else "")
    except subprocess.TimeoutExpired:
        failed, reason = True, "timeout"
    wall = time.perf_counter() - t0
    if output_dir:
        shutil.rmtree(output_dir, ignore_errors=True)
    if failed or not os.path.exists(report):
        tail = proc.stderr[-2000:] if "proc" in locals() and proc.stderr else ""
        logger.error("%s at %d images failed after %.0f s: %s\n%s", path, size, wall, reason, tail)
        return None
    with open(report) as f:
        result = json.load(f)
    result["wall_s"] = wall
    return result


def _fmt_row(cells, widths):
    return " | ".join(str(c).rjust(w) for c, w in zip(cells, widths))


def print_table(results):
    header = ["path", "images", "detections"]
    for stage in STAGES:
        header += [f"{stage} s", f"{stage} MB"]
    header += ["eval total s", "peak MB", "peak-base MB"]
    widths = [max(len(h), 9) for h in header]
    print(_fmt_row(header, widths))
    print("-+-".join("-" * w for w in widths))
    for r in results:
        row = [r["path"], r["images"], r["detections"]]
        for stage in STAGES:
            s = r["stages"].get(stage, {"time_s": float("nan"), "peak_mb": float("nan")})
            row += [f"{s['time_s']:.1f}", f"{s['peak_mb']:.0f}"]
        total = sum(r["stages"][s]["time_s"] for s in STAGES if s in r["stages"])
        row += [f"{total:.1f}", f"{r['peak_mb']:.0f}", f"{r['peak_mb'] - r['baseline_mb']:.0f}"]
        print(_fmt_row(row, widths))


POST_INFERENCE = ("gather+write", "bbox", "segm")
METRICS_ONLY = ("bbox", "segm")


def _post(r, key, stages=POST_INFERENCE):
    return sum(r["stages"][s].get(key, float("nan")) for s in stages if s in r["stages"])


def print_post_inference(results, target, stages=POST_INFERENCE, title=None):
    """Time of ``stages`` (default: what follows inference, gather + results file + box and mask
    metrics), per path and size, with the speed-up over ``ours`` at the same size, and
    extrapolated to ``target`` images. ``child MB``: peak RSS of the json-writing child."""
    title = title or "Post-inference (gather+write + bbox + segm)"
    print(f"\n{title}; speed-up = ours / path, same size:")
    widths = [11, 7, 8, 8, 8, 8, 9, 10]
    header = ["path", "images", "wall s", "cpu s", "peak MB", "child MB", "x (cpu)", "x (wall)"]
    print(_fmt_row(header, widths))
    ours = {r["images"]: r for r in results if r["path"] == "ours"}
    for r in results:
        base = ours.get(r["images"])
        cpu, wall = _post(r, "cpu_s", stages), _post(r, "time_s", stages)
        peak = max(r["stages"][s]["peak_mb"] for s in stages if s in r["stages"])
        child = f"{r.get('child_peak_mb', 0):.0f}" if r.get("child_peak_mb") else "-"
        x_cpu = f"{_post(base, 'cpu_s', stages) / cpu:.2f}" if base else "-"
        x_wall = f"{_post(base, 'time_s', stages) / wall:.2f}" if base else "-"
        row = [r["path"], r["images"], f"{wall:.1f}", f"{cpu:.1f}", f"{peak:.0f}", child]
        print(_fmt_row(row + [x_cpu, x_wall], widths))
    print(f"extrapolated to {target} images (least squares over the sizes):")
    fits = {}
    for path in PATHS:
        runs = [r for r in results if r["path"] == path]
        if not runs:
            continue
        xs = [r["images"] for r in runs]
        cpu = _fit(xs, [_post(r, "cpu_s", stages) for r in runs], target)
        wall = _fit(xs, [_post(r, "time_s", stages) for r in runs], target)
        peaks = [max(r["stages"][s]["peak_mb"] for s in stages) for r in runs]
        fits[path] = (wall, cpu, _fit(xs, peaks, target))
    for path, (wall, cpu, peak) in fits.items():
        x = f"{fits['ours'][1] / cpu:.2f}" if "ours" in fits else "-"
        xw = f"{fits['ours'][0] / wall:.2f}" if "ours" in fits else "-"
        row = [path, target, f"{wall:.0f}", f"{cpu:.0f}", f"{peak:.0f}", "", x, xw]
        print(_fmt_row(row, widths))


def _fit(xs, ys, at):
    """Least-squares line through (xs, ys), evaluated at ``at`` (a single point: proportional)."""
    if len(xs) == 1:
        return ys[0] * at / xs[0]
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return slope * at + intercept


def print_extrapolation(results, target):
    print(f"\nLinear extrapolation (least squares over the measured sizes) to {target} images:")
    widths = [11, 16, 10, 10]
    print(_fmt_row(["path", "stage", "time s", "peak MB"], widths))
    if len({r["images"] for r in results}) < 2:
        print("(one size only: proportional scaling, which overstates the fixed baseline)")
    for path in PATHS:
        runs = [r for r in results if r["path"] == path]
        if not runs:
            continue
        xs = [r["images"] for r in runs]
        for stage in STAGES:
            t = _fit(xs, [r["stages"][stage]["time_s"] for r in runs], target)
            m = _fit(xs, [r["stages"][stage]["peak_mb"] for r in runs], target)
            print(_fmt_row([path, stage, f"{t:.0f}", f"{m:.0f}"], widths))
        total = _fit(xs, [sum(r["stages"][s]["time_s"] for s in STAGES) for r in runs], target)
        peak = _fit(xs, [r["peak_mb"] for r in runs], target)
        print(_fmt_row([path, "TOTAL / PEAK", f"{total:.0f}", f"{peak:.0f}"], widths))
        base = _fit(xs, [r["peak_mb"] - r["baseline_mb"] for r in runs], target)
        print(_fmt_row([path, "peak - baseline", "", f"{base:.0f}"], widths))


def _same_metrics(a, b):
    if a.keys() != b.keys():
        return False
    return all(
        (math.isnan(x) and math.isnan(y)) or x == y
        for task in a
        for x, y in ((a[task][k], b[task][k]) for k in a[task])
    )


def _max_abs_diff(a, b):
    """{task: (largest |a - b| over the metrics, its metric)} in AP points."""
    out = {}
    for task in a:
        if task not in b:
            continue
        diffs = [(abs(a[task][k] - b[task][k]), k) for k in a[task] if k in b[task]]
        out[task] = max(diffs)
    return out


def main():
    disalign_det.compat.apply_legacy_shims()  # numpy aliases: the stock LVISEvaluator
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="200,500,1000", help="comma-separated image counts")
    parser.add_argument("--images", type=int, help="a single size (overrides --sizes)")
    parser.add_argument(
        "--paths",
        default="stock,ours",
        help="comma-separated: stock, ours, fast, fast-inline, faster",
    )
    parser.add_argument("--dets", type=int, default=300, help="detections per image")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per worker run")
    parser.add_argument("--target", type=int, default=LVIS_VAL_IMAGES, help="extrapolate to")
    parser.add_argument(
        "--no-output-dir", action="store_true", help="evaluate without result files"
    )
    parser.add_argument("--workdir", help="keep generated files here (default: a temp dir)")
    parser.add_argument("--save", help="write all reports to this JSON file")
    parser.add_argument(
        "--load",
        default="",
        help="comma-separated --save files of earlier runs to include in the table and the fit",
    )
    parser.add_argument(
        "--no-share-collect",
        dest="share_collect",
        action="store_false",
        help="let every streaming path run its own process() loop (default: collect once per "
        "size and evaluate copies of that shard)",
    )
    # Internal: run one path in this process.
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--gt", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--shard-cache", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.worker:
        logging.getLogger().setLevel(logging.WARNING)  # keep the LVIS API's chatter out
        run_worker(args)
        return

    sizes = [args.images] if args.images else [int(s) for s in args.sizes.split(",") if s]
    paths = [p for p in args.paths.split(",") if p]
    workdir = args.workdir or tempfile.mkdtemp(prefix="lvis_bench_")
    os.makedirs(workdir, exist_ok=True)
    templates = make_templates(args.seed, args.height, args.width, args.dets)
    results = []
    for size in sizes:
        gt_path = os.path.join(workdir, f"gt_{size}.json")
        num_anns = write_ground_truth(gt_path, size, args.seed, args.height, args.width, templates)
        logger.info("%d images, %d GT annotations, %d detections", size, num_anns, size * args.dets)
        by_path = {}
        for path in paths:
            logger.info("running %s on %d images (timeout %d s)", path, size, args.timeout)
            result = _run_one(args, path, size, gt_path, workdir)
            if result is not None:
                logger.info("%s: %.0f s, peak %.0f MB", path, result["wall_s"], result["peak_mb"])
                results.append(result)
                by_path[path] = result
        for other in ("stock", "fast", "fast-inline", "faster"):
            if other not in by_path or "ours" not in by_path:
                continue
            a, b = by_path["ours"]["metrics"], by_path[other]["metrics"]
            same = _same_metrics(a, b)
            logger.info("metrics identical for ours and %s at %d images: %s", other, size, same)
            if not same:
                diff = _max_abs_diff(a, b)
                logger.warning("ours vs %s, largest |difference| (AP points): %s", other, diff)
                by_path[other]["max_abs_diff"] = diff
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.save:  # this run's reports only
        with open(args.save, "w") as f:
            json.dump(results, f, indent=1)
    for saved in filter(None, args.load.split(",")):
        with open(saved) as f:
            results += json.load(f)
    results.sort(key=lambda r: (r["images"], PATHS.index(r["path"])))

    print()
    print_table(results)
    if results:
        print_extrapolation(results, args.target)
        print_post_inference(results, args.target)
        print_post_inference(
            results,
            args.target,
            METRICS_ONLY,
            "Metric computation (bbox + segm; for fast it includes waiting for the json child)",
        )


if __name__ == "__main__":
    main()
