#!/usr/bin/env python
"""Speed and memory of DisAlign stage two against stage one, measured in ONE run on the same
machine with the same input batch.

    python tools/benchmark_speed.py [--config-set lvis|synthetic|both] [--iters 8] [--warmup 2]

Ratios printed (goals in brackets):

* stage-two time per training iteration (detectron2's ``SimpleTrainer.run_step``: forward,
  backward, metrics, optimizer step; no data loading) / the same model's forward pass in training
  mode without gradients (``model.train()`` under ``torch.no_grad()``)  [<= 1.15]: what the
  backward pass, the optimizer step and the bookkeeping add on top of the forward pass;
* stage-two time per iteration / stage-one time per iteration;
* inference time per image, DisAlign / plain Mask R-CNN, same weights (the DisAlign model is loaded
  from the stage-one state with its calibration at the identity)  [<= 1.03];
* peak memory of training, stage two / stage one  [<= 0.80].

Config sets: ``lvis`` = configs/LVIS/mask_rcnn_R_50_FPN_2x.yaml vs disalign_mask_rcnn.yaml
(R50-FPN, 1203 classes; CPU-sized synthetic input: batch 2 of 320 x 256 images with random boxes
and masks), ``synthetic`` = configs/LVIS/synthetic/mask_rcnn_synth.yaml vs disalign_synth.yaml
(batch 4 of 128 x 128, as the configs train). No dataset and no pretrained weights are needed:
models are randomly initialised (seed 0; box regressions zeroed so that the model outputs the
configured number of detections, see ``stage_one_state``; ``--synthetic-weights`` /
``--lvis-weights`` use a trained stage-one checkpoint instead) and the LR is 0, so every
iteration does the same work.
Data loading is not timed (the batch is built once, in memory).

Timing: all measurements of a config set take turns inside each round (the order rotates from round
to round) so that background load on a shared machine hits all of them alike; each number is the
median over ``--iters`` rounds after ``--warmup`` rounds. One torch thread by default
(``--threads``): on a busy machine several threads per process make timings erratic.

Memory: each measurement runs in its own child process, so that neither stage inherits the
other's allocator state (freed-but-kept heap, caches). The child builds the model, loads the shared
initial weights, frees what it can, then resets the kernel's peak-RSS counter
(/proc/self/clear_refs) and runs training iterations. "Training memory" is the peak RSS during
those iterations minus the RSS just before them: activations, gradients, optimizer state and
allocator slack, without the interpreter, the libraries and the weights, which are the same for
both stages (on a GPU one would take ``torch.cuda.max_memory_allocated`` minus the allocation
before the iterations). RSS rather than the torch profiler: it sees every allocation (also
outside torch's allocator) and costs nothing during the iterations. The total peak RSS is printed
too.
"""

import argparse
import copy
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))
# lab/ (the experiment code) is not installed: it is imported from this checkout. Run as a script,
# Python puts tools/ on sys.path, not the checkout's root, hence this one line (appended: an
# installed disalign_det still wins).
sys.path.append(ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import disalign_det  # noqa: E402  (a real _C or the stand-in, registrations)

disalign_det.compat.apply_legacy_shims()  # numpy aliases: detectron2 v0.6's loader, lvis
from disalign_det.utils.memory import (  # noqa: E402
    current_rss_mb,
    peak_rss_mb,
    release_memory,
    reset_peak_rss,
)
from lab.stats import median  # noqa: E402

logger = logging.getLogger("disalign_det.benchmark_speed")

CONFIGS = os.path.join(ROOT, "configs", "LVIS")
CONFIG_SETS = {
    # name: (stage one, stage two, batch, (height, width), ground-truth objects per image)
    "lvis": ("mask_rcnn_R_50_FPN_2x.yaml", "disalign_mask_rcnn.yaml", 2, (256, 320), 8),
    "synthetic": (
        "synthetic/mask_rcnn_synth.yaml",
        "synthetic/disalign_synth.yaml",
        4,
        (128, 128),
        4,
    ),
}
LVIS_LIKE = "speed_lvis_v1_like"


def apply_overrides(batch=None, size=None):
    """Use another batch size / image size (square, ``size`` x ``size``) for every config set."""
    for name, (one, two, b, hw, num_obj) in list(CONFIG_SETS.items()):
        CONFIG_SETS[name] = (one, two, batch or b, (size, size) if size else hw, num_obj)


GOALS = {"iter_vs_forward": 1.15, "inference": 1.03, "memory": 0.80}
MEASURES = ("s1_iter", "s2_iter", "s2_forward", "infer_plain", "infer_disalign")


# --------------------------------------------------------------------------------------------------
# Models and inputs
# --------------------------------------------------------------------------------------------------


def lvis_like_dataset(workdir: str) -> str:
    """Register (once) a json-only LVIS-format dataset with 1203 long-tailed categories, so that
    the LVIS configs' GRW weights can be computed without the 1 GB LVIS train json. Its counts fall
    geometrically from 20000 to 1 image per class; only the GRW weights' values depend on them,
    not the amount of computation."""
    from disalign_det.data import register_lvis_format
    from disalign_det.data.frequency import frequency_bucket

    path = os.path.join(workdir, "lvis_v1_like.json")
    if not os.path.isfile(path):
        counts = np.maximum(1, np.round(np.geomspace(20000, 1, 1203))).astype(int)
        cats = [
            {
                "id": k + 1,
                "name": f"class_{k + 1}",
                "frequency": frequency_bucket(int(n)),
                "image_count": int(n),
                "instance_count": int(2 * n),
            }
            for k, n in enumerate(counts)
        ]
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"images": [], "annotations": [], "categories": cats}, f)
        os.replace(tmp, path)
    register_lvis_format(LVIS_LIKE, path, workdir)
    return LVIS_LIKE


def make_cfg(config_set: str, stage: str, workdir: str):
    """The config of ``stage`` ("one"/"two") of ``config_set``, made runnable without data."""
    from detectron2.config import get_cfg

    from disalign_det import add_disalign_config

    one, two = CONFIG_SETS[config_set][:2]
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, one if stage == "one" else two))
    opts = [
        "MODEL.DEVICE", "cpu",
        "MODEL.WEIGHTS", "",
        # LR 0: the weights never change, so every iteration does exactly the same work (a real
        # LR on a random model soon diverges and changes the number of detections).
        "SOLVER.BASE_LR", "0.0",
        "DATASETS.TEST", "()",
    ]  # fmt: skip
    if config_set == "lvis":
        opts += ["DATASETS.TRAIN", f"('{lvis_like_dataset(workdir)}',)"]
    cfg.merge_from_list(opts)
    cfg.freeze()
    return cfg


def build_model(cfg, state=None):
    """``Trainer.build_model`` (stage two: frozen but the calibration) with ``state`` loaded."""
    from disalign_det.engine import Trainer
    from disalign_det.modeling import install_class_weights, is_calibration_parameter

    log = logging.getLogger("disalign_det.engine.trainer")
    level = log.level
    log.setLevel(logging.WARNING)  # build_model logs the whole model at INFO
    try:
        model = Trainer.build_model(cfg)
        install_class_weights(model, cfg)  # the GRW weights its training steps need
    finally:
        log.setLevel(level)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        wrong = [k for k in missing if not is_calibration_parameter(k)] + list(unexpected)
        if wrong:
            raise RuntimeError(f"stage-one state does not fit the stage-two model: {wrong[:5]}")
    return model


# Parameters of the box regressions (RPN anchor deltas, ROI-head box deltas).
_REGRESSION = ("anchor_deltas", "bbox_pred")


def stage_one_state(cfg, weights: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The stage-one 'checkpoint' both stages start from: ``weights`` (a trained stage-one
    checkpoint) if given, else a random initialisation (seed 0) whose box regressions are zeroed.

    Why zeroed: a random R50 with frozen BatchNorm regresses huge deltas, almost every box comes
    out empty and inference ends with a handful of detections, so the per-detection work (the
    mask head on up to TEST.DETECTIONS_PER_IMAGE boxes) would be left out of the comparison. With
    zero deltas proposals are anchors and detections are proposals: valid boxes, and the model
    outputs the configured number of detections per image, as a trained one does.
    """
    from detectron2.checkpoint import DetectionCheckpointer

    torch.manual_seed(0)
    model = build_model(cfg)
    if weights:
        DetectionCheckpointer(model).load(weights)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not weights:
        for k, v in state.items():
            if any(part in _REGRESSION for part in k.split(".")):
                v.zero_()
    return state


def make_batch(config_set: str, num_classes: int, seed: int = 0, train: bool = True) -> List[dict]:
    """A fixed input batch: smooth random images with random boxes, elliptic masks and classes."""
    from detectron2.structures import BitMasks, Boxes, Instances

    _, _, batch, (h, w), num_obj = CONFIG_SETS[config_set]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        # Low-frequency noise upsampled: image statistics closer to a photo than white noise.
        small = torch.rand((3, h // 16 + 1, w // 16 + 1), generator=g)
        img = torch.nn.functional.interpolate(small[None], size=(h, w), mode="bilinear")[0]
        img = (img * 255).to(torch.uint8)
        record = {"image": img, "height": h, "width": w}
        if train:
            side = torch.randint(min(h, w) // 10, min(h, w) // 2, (num_obj, 2), generator=g)
            x0 = (torch.rand(num_obj, generator=g) * (w - side[:, 0])).floor()
            y0 = (torch.rand(num_obj, generator=g) * (h - side[:, 1])).floor()
            boxes = torch.stack([x0, y0, x0 + side[:, 0], y0 + side[:, 1]], dim=1).float()
            yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            masks = []
            for x1, y1, x2, y2 in boxes.tolist():
                cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
                masks.append(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0)
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(boxes)
            inst.gt_classes = torch.randint(0, num_classes, (num_obj,), generator=g)
            inst.gt_masks = BitMasks(torch.stack(masks))
            record["instances"] = inst
        out.append(record)
    return out


def training_step(cfg, model, batch):
    """detectron2's ``SimpleTrainer`` (forward, backward, metrics, optimizer step: one training
    iteration as the trainer runs it, minus data loading) fed ``batch`` over and over."""
    from detectron2.engine import SimpleTrainer

    from disalign_det.engine import Trainer

    return SimpleTrainer(model, itertools.repeat(batch), Trainer.build_optimizer(cfg, model))


class Bench:
    """Callables for every measurement of one config set, on shared weights and one batch."""

    def __init__(self, config_set: str, workdir: str, weights: Optional[str] = None):
        self.config_set = config_set
        self.cfg1 = make_cfg(config_set, "one", workdir)
        self.cfg2 = make_cfg(config_set, "two", workdir)
        state = stage_one_state(self.cfg1, weights)
        k = self.cfg1.MODEL.ROI_HEADS.NUM_CLASSES
        self.batch = make_batch(config_set, k)
        self.images = [{kk: v for kk, v in d.items() if kk != "instances"} for d in self.batch]
        self.m1 = build_model(self.cfg1, state)
        self.m2 = build_model(self.cfg2, state)
        # Inference copies taken now, before any training step: BatchNorm running statistics of
        # the stage-one model move in training mode (LR 0 or not), the weights do not.
        self.inf1 = copy.deepcopy(self.m1).eval()
        self.inf2 = copy.deepcopy(self.m2).eval()
        self.m1.train()
        self.m2.train()
        self.t1 = training_step(self.cfg1, self.m1, self.batch)
        self.t2 = training_step(self.cfg2, self.m2, self.batch)
        self.num_detections = None

    def s1_iter(self):
        self.t1.run_step()

    def s2_iter(self):
        self.t2.run_step()

    def s2_forward(self):
        with torch.no_grad():
            self.m2(self.batch)

    def infer_plain(self):
        with torch.no_grad():
            out = self.inf1(self.images)
        self.num_detections = [len(o["instances"]) for o in out]

    def infer_disalign(self):
        with torch.no_grad():
            self.inf2(self.images)


def time_interleaved(bench: Bench, iters: int, warmup: int, log=print) -> Dict[str, List[float]]:
    """Seconds per call of every measure, round-robin with a rotating order, warm-up dropped."""
    from detectron2.utils.events import EventStorage

    times = {m: [] for m in MEASURES}
    with EventStorage(0):
        for r in range(warmup + iters):
            order = MEASURES[r % len(MEASURES) :] + MEASURES[: r % len(MEASURES)]
            for m in order:
                start = time.perf_counter()
                getattr(bench, m)()
                dt = time.perf_counter() - start
                if r >= warmup:
                    times[m].append(dt)
            log(
                f"[speed] {bench.config_set} round {r + 1}/{warmup + iters}"
                + (" (warm-up)" if r < warmup else "")
                + ": "
                + ", ".join(f"{m} {times[m][-1] * 1000:.0f} ms" for m in MEASURES if times[m])
            )
    return times


# --------------------------------------------------------------------------------------------------
# Memory (child processes)
# --------------------------------------------------------------------------------------------------


def memory_worker(config_set: str, stage: str, state_path: str, workdir: str, iters: int) -> dict:
    """In a fresh process: peak RSS of ``iters`` training iterations of ``stage``."""
    from detectron2.utils.events import EventStorage

    cfg = make_cfg(config_set, stage, workdir)
    state = torch.load(state_path, weights_only=True)
    model = build_model(cfg, state)
    del state
    step = training_step(cfg, model, make_batch(config_set, cfg.MODEL.ROI_HEADS.NUM_CLASSES))
    release_memory()
    baseline = current_rss_mb()
    exact = reset_peak_rss()
    with EventStorage(0):
        for _ in range(iters):
            step.run_step()
    peak = peak_rss_mb()
    return {
        "baseline_mb": baseline,
        "peak_mb": peak,
        "training_mb": peak - baseline,
        "peak_reset": exact,
    }


def measure_memory(
    config_set, workdir, iters, repeats, threads, overrides=(), weights=None, log=print
) -> Dict[str, dict]:
    """Peak-RSS measurements of both stages, each in its own child process, alternating."""
    cfg1 = make_cfg(config_set, "one", workdir)
    state_path = os.path.join(workdir, f"{config_set}_stage_one.pth")
    if not os.path.isfile(state_path):
        torch.save(stage_one_state(cfg1, weights), state_path)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    runs = {"one": [], "two": []}
    for _ in range(repeats):
        for stage in ("one", "two"):
            cmd = [
                sys.executable, os.path.abspath(__file__), "--memory-worker", stage,
                "--config-set", config_set, "--state", state_path, "--workdir", workdir,
                "--iters", str(iters),
            ]  # fmt: skip
            cmd += ["--threads", str(threads or 0), *overrides]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(
                    f"memory worker ({config_set}, stage {stage}) failed:\n{proc.stderr[-3000:]}"
                )
            res = json.loads(lines[-1][len("RESULT ") :])
            runs[stage].append(res)
            log(
                f"[speed] {config_set} memory, stage {stage}: training {res['training_mb']:.0f} "
                f"MiB, peak RSS {res['peak_mb']:.0f} MiB"
            )
    out = {}
    for stage, rs in runs.items():
        out[stage] = {
            k: median([r[k] for r in rs]) for k in ("baseline_mb", "peak_mb", "training_mb")
        }
        out[stage]["peak_reset"] = all(r["peak_reset"] for r in rs)
    return out


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def ratios(times: Dict[str, float], memory: Dict[str, dict] = None) -> Dict[str, float]:
    """The ratios of the table from median times (seconds) and memory results."""
    r = {
        "iter_vs_forward": times["s2_iter"] / times["s2_forward"],
        "s2_vs_s1_iter": times["s2_iter"] / times["s1_iter"],
        "inference": times["infer_disalign"] / times["infer_plain"],
    }
    if memory:
        r["memory"] = memory["two"]["training_mb"] / memory["one"]["training_mb"]
        r["memory_total"] = memory["two"]["peak_mb"] / memory["one"]["peak_mb"]
    return r


RATIO_ROWS = (
    ("iter_vs_forward", "stage-two iteration / its no-grad train-mode forward", "<= 1.15"),
    ("s2_vs_s1_iter", "stage-two iteration / stage-one iteration", ""),
    ("inference", "inference per image, DisAlign / Mask R-CNN", "<= 1.03"),
    ("memory", "training memory (peak RSS - RSS before), stage two / one", "<= 0.80"),
    ("memory_total", "total peak RSS, stage two / one (incl. libraries, weights)", ""),
)
RAW_ROWS = (
    ("s1_iter", "stage-one iteration (ms)"),
    ("s2_iter", "stage-two iteration (ms)"),
    ("s2_forward", "stage-two forward, train mode, no grad (ms)"),
    ("infer_plain", "Mask R-CNN inference (ms / image)"),
    ("infer_disalign", "DisAlign inference (ms / image)"),
)


def _cell(v, fmt):
    return "n/a" if v is None or not np.isfinite(v) else format(v, fmt)


def format_tables(results: Dict[str, dict]) -> str:
    sets = list(results)
    head = "| " + " | ".join(["measurement", *sets, "goal"]) + " |"
    sep = "|" + "---|" * (len(sets) + 2)
    lines = ["Ratios:", "", head, sep]
    for key, label, goal in RATIO_ROWS:
        cells = [_cell(results[s]["ratios"].get(key), ".3f") for s in sets]
        lines.append("| " + " | ".join([label, *cells, goal]) + " |")
    lines += ["", "Raw measurements (median; min-max over rounds):", "", head, sep]
    for key, label in RAW_ROWS:
        cells = []
        for s in sets:
            t = results[s]["raw"][key]
            scale = 1000.0 / (results[s]["batch"] if key.startswith("infer") else 1)
            cells.append(
                f"{t['median'] * scale:.1f} ({t['min'] * scale:.1f}-{t['max'] * scale:.1f})"
            )
        lines.append("| " + " | ".join([label, *cells, ""]) + " |")
    for stage in ("one", "two"):
        for key, what in (("training_mb", "training memory"), ("peak_mb", "total peak RSS")):
            cells = [
                _cell(results[s].get("memory", {}).get(stage, {}).get(key), ".0f") for s in sets
            ]
            lines.append("| " + " | ".join([f"stage {stage} {what} (MiB)", *cells, ""]) + " |")
    return "\n".join(lines)


def run(
    config_sets,
    iters,
    warmup,
    mem_iters,
    mem_repeats,
    threads,
    skip_memory=False,
    overrides=(),
    weights=None,
    log=print,
):
    """Measure every config set; returns {set: {"raw", "ratios", "memory", ...}}."""
    results = {}
    workdir = tempfile.mkdtemp(prefix="disalign_speed_")
    for cs in config_sets:
        log(f"[speed] {cs}: building models ({CONFIG_SETS[cs][0]} vs {CONFIG_SETS[cs][1]})")
        w = (weights or {}).get(cs)
        bench = Bench(cs, workdir, w)
        times = time_interleaved(bench, iters, warmup, log)
        batch = CONFIG_SETS[cs][2]
        # Inference runs the whole batch at once; per image = per call / batch.
        med = {m: median(v) / (batch if m.startswith("infer") else 1) for m, v in times.items()}
        raw = {
            m: {"median": median(v), "min": min(v), "max": max(v), "all": v}
            for m, v in times.items()
        }
        memory = None
        if not skip_memory:
            memory = measure_memory(cs, workdir, mem_iters, mem_repeats, threads, overrides, w, log)
        results[cs] = {
            "weights": w or "random init (seed 0), box regressions zeroed",
            "configs": CONFIG_SETS[cs][:2],
            "batch": batch,
            "image_hw": CONFIG_SETS[cs][3],
            "gt_per_image": CONFIG_SETS[cs][4],
            "detections_per_image": bench.num_detections,
            "raw": raw,
            "ratios": ratios(med, memory),
        }
        if memory:
            results[cs]["memory"] = memory
        del bench
        release_memory()
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-set", choices=("lvis", "synthetic", "both"), default="both")
    parser.add_argument("--iters", type=int, default=8, help="timed rounds (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--mem-iters", type=int, default=3, help="training iterations per memory run"
    )
    parser.add_argument("--mem-repeats", type=int, default=1)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a busy or shared machine several threads "
        "per process make timings erratic; 0 = torch's default)",
    )
    for cs in CONFIG_SETS:
        parser.add_argument(
            f"--{cs}-weights",
            default=None,
            help=f"a trained stage-one checkpoint for the {cs} set (default: random init)",
        )
    parser.add_argument("--batch", type=int, default=None, help="override the batch size")
    parser.add_argument("--size", type=int, default=None, help="override: square images, px")
    parser.add_argument("--json", default=None, help="also write every number to this file")
    # Internal: one memory measurement in this (child) process.
    parser.add_argument("--memory-worker", choices=("one", "two"), help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads_before)  # main() may be called in-process (tests)


def _main(args) -> int:
    apply_overrides(args.batch, args.size)
    overrides = []
    if args.batch:
        overrides += ["--batch", str(args.batch)]
    if args.size:
        overrides += ["--size", str(args.size)]
    if args.memory_worker:
        cs = "lvis" if args.config_set == "both" else args.config_set
        res = memory_worker(cs, args.memory_worker, args.state, args.workdir, args.iters)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    sets = ["lvis", "synthetic"] if args.config_set == "both" else [args.config_set]
    load_before = os.getloadavg()
    start = time.perf_counter()
    results = run(
        sets,
        args.iters,
        args.warmup,
        args.mem_iters,
        args.mem_repeats,
        args.threads,
        skip_memory=args.skip_memory,
        overrides=overrides,
        weights={"lvis": args.lvis_weights, "synthetic": args.synthetic_weights},
    )
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    print()
    print(format_tables(results))
    print(
        f"\n{args.iters} timed rounds after {args.warmup} warm-up, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {os.cpu_count()} CPU core(s); load average "
        f"{load_before[0]:.1f} before / {load_after[0]:.1f} after (a shared machine makes "
        f"absolute times noisy; the interleaved ratios less so). Wall time {wall:.0f} s."
    )
    for s, r in results.items():
        print(
            f"{s}: weights {r['weights']}; batch {r['batch']} of {r['image_hw'][0]} x "
            f"{r['image_hw'][1]} px, {r['gt_per_image']} ground-truth objects per image; "
            f"detections per image at inference {r['detections_per_image']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"results": results, "load_average": [load_before, load_after], "wall_s": wall},
                f,
                indent=1,
            )
        print(f"Written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
