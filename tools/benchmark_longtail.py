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
saved detections, which equals running the model at that limit (see ``run_per_class_ap``).
"""

import argparse
import copy
import datetime
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The built-in datasets live under $DETECTRON2_DATASETS (default: "datasets", relative to the
# working directory); anchor it to the repository so this process and its runs agree.
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))

import disalign_det  # noqa: E402,F401  (shims and registrations before detectron2)
from disalign_det.benchmark import (  # noqa: E402
    PerClassAP,
    format_gain,
    format_stats,
    gain_stats,
    lvis_per_class_ap,
    seed_stats,
)
from disalign_det.report import METRICS, load_metrics, metrics_table  # noqa: E402

logger = logging.getLogger("disalign_det.benchmark_longtail")

SYNTH = os.path.join(ROOT, "configs", "LVIS", "synthetic")
TASKS = ("bbox", "segm")
TASK_LABEL = {"bbox": "box", "segm": "mask"}


# --------------------------------------------------------------------------------------------------
# What is compared
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageOne:
    """A stage-one recipe and the stage-two configs that go with it."""

    key: str
    label: str
    config: str
    disalign_box_only: str
    disalign_box_mask: str
    tau_norm: bool  # tau-normalisation needs a linear (non-cosine) classifier


STAGE_ONES = OrderedDict(
    (s.key, s)
    for s in (
        StageOne(
            key="softmax",
            label="softmax",
            config="mask_rcnn_synth.yaml",
            disalign_box_only="disalign_box_only_synth.yaml",
            disalign_box_mask="disalign_synth.yaml",
            tau_norm=True,
        ),
        # RFS only changes stage one's sampling; its stage two is the plain one (uniform sampling,
        # as in the official recipe).
        StageOne(
            key="rfs",
            label="RFS",
            config="mask_rcnn_synth_rfs.yaml",
            disalign_box_only="disalign_box_only_synth.yaml",
            disalign_box_mask="disalign_synth.yaml",
            tau_norm=True,
        ),
        StageOne(
            key="cosine",
            label="cosine",
            config="mask_rcnn_synth_cosine.yaml",
            disalign_box_only="disalign_box_only_synth_cosine.yaml",
            disalign_box_mask="disalign_synth_cosine.yaml",
            tau_norm=False,
        ),
    )
)

# Evaluating a stage-one checkpoint with a post-hoc adjustment: the DisAlign predictor with
# calibration and re-weighting off is the stock predictor with the same parameter names, so the
# stage-one weights load unchanged (the cosine stage one already uses it); only POSTHOC differs.
POSTHOC_DELTA = (
    "MODEL.ROI_HEADS.NAME", "DisAlignROIHeads",
    "MODEL.DISALIGN.BOX_CALIBRATION", "False",
    "MODEL.DISALIGN.CLS_LOSS", "ce",
)  # fmt: skip

POSTHOC_LABEL = {"norcal": "NorCal γ={p:g}", "tau_norm": "τ-norm τ={p:g}"}


@dataclass
class Preset:
    """Schedules and sizes of one benchmark run (see ``PRESETS``)."""

    name: str
    seeds: Tuple[int, ...]
    stage_one_iters: int
    stage_two_iters: int
    posthoc_powers: Tuple[float, ...] = (1.0,)
    # Appended to every run's command line (e.g. a different dataset in the smoke test).
    extra_opts: Tuple[str, ...] = ()
    note: str = ""

    def stage_one_opts(self) -> List[str]:
        n = self.stage_one_iters
        # The configs' 1500-iteration schedule: LR steps at 11/15 and 9/10 of it scaled to n; the
        # 100-iteration warm-up is kept (a shorter one diverges from scratch), capped for tiny n.
        return _schedule(n, steps=(round(n * 11 / 15), round(n * 9 / 10)), warmup=min(100, n // 4))

    def stage_two_opts(self) -> List[str]:
        n = self.stage_two_iters
        # The configs' 300-iteration stage two: LR step at 5/6 scaled to n, warm-up 20 kept.
        return _schedule(n, steps=(round(n * 5 / 6),), warmup=min(20, n // 4))


def _schedule(n, steps, warmup):
    steps = tuple(s for s in steps if 0 < s < n)
    return [
        "SOLVER.MAX_ITER", str(n),
        "SOLVER.STEPS", str(steps).replace(" ", "") if len(steps) != 1 else f"({steps[0]},)",
        "SOLVER.WARMUP_ITERS", str(warmup),
        # Only model_final is needed; intermediate checkpoints cost time and disk.
        "SOLVER.CHECKPOINT_PERIOD", str(10 * n),
    ]  # fmt: skip


# Sized from the CPU seconds of a quick run measured on the 2-core development machine (the
# md's "Run times" table, 1 thread per run): a stage-one run costs ~35 s + 0.42 s per iteration
# (batch 4 of 128 px), a stage-two run ~27 s + 0.14 s per iteration, a post-hoc run ~27 s (one
# evaluation of the 160 val images, plus start-up). Two runs execute side by side (--jobs 2), so
# wall time is about total CPU / 2 plus the tail after the last stage one:
#   quick: 3 x 161 + 6 x 41 + 5 x 27 = ~860 CPU-s -> ~8 min on 2 idle cores;
#   full (3 seeds): 9 x 329 + 18 x 55 + 15 x 27 = ~4350 CPU-s -> ~38 min on 2 idle cores.
# Measured for the full preset from an empty folder: 4220 CPU-s, 36.1 min wall (docs/benchmark.md).
PRESETS = {
    "quick": Preset(
        "quick",
        seeds=(0,),
        stage_one_iters=300,
        stage_two_iters=100,
        note="quick preset: ONE seed and short schedules (stage one far from converged), a smoke "
        "run of the comparison; no seed spread, so no gain can be called significant",
    ),
    "full": Preset("full", seeds=(0, 1, 2), stage_one_iters=700, stage_two_iters=200),
}


@dataclass
class Run:
    """One ``train_net.py`` invocation."""

    key: str  # seed<S>/<stage one>/<method>, also the output sub-folder
    seed: int
    stage_one: str
    method: str  # "stage_one", "disalign_box_only", "disalign_box_mask", "norcal_1", ...
    label: str
    config: str
    opts: List[str]
    eval_only: bool = False
    weights_from: Optional[str] = None  # key of the run whose model_final.pth is MODEL.WEIGHTS
    out_dir: str = ""
    # Filled after running.
    status: str = "pending"  # pending / done / reused / failed / skipped
    wall_s: Optional[float] = None
    cpu_s: Optional[float] = None  # CPU seconds of the run's process (subprocess runner only)
    metrics: Optional[dict] = None
    error: Optional[str] = None

    def command_args(self) -> List[str]:
        args = ["--config-file", self.config, "--resume"]
        if self.eval_only:
            args.append("--eval-only")
        args += ["OUTPUT_DIR", self.out_dir, *self.opts]
        return args


def method_rows(stage_ones: Sequence[str], powers: Sequence[float]) -> List[Tuple[str, str, str]]:
    """(stage one, method, row label) of every table row, in table order."""
    rows = []
    for g in stage_ones:
        s1 = STAGE_ONES[g]
        rows.append((g, "stage_one", f"{s1.label} (stage one)"))
        rows.append((g, "disalign_box_only", f"{s1.label} + DisAlign box-only"))
        rows.append((g, "disalign_box_mask", f"{s1.label} + DisAlign box+mask"))
        for kind in ("norcal", "tau_norm"):
            if kind == "tau_norm" and not s1.tau_norm:
                continue
            for p in powers:
                rows.append(
                    (g, _posthoc_method(kind, p), f"{s1.label} + {_posthoc_label(kind, p)}")
                )
    return rows


def _posthoc_method(kind, p):
    return f"{kind}_{p:g}"


def _posthoc_label(kind, p):
    return POSTHOC_LABEL[kind].format(p=p)


def build_plan(preset: Preset, out_dir: str, stage_ones: Sequence[str]) -> List[List[Run]]:
    """The runs, grouped in chains: one chain per (seed, stage one), its stage one first; every
    other run of a chain needs the chain's stage-one checkpoint (``weights_from``)."""
    chains = []
    for seed in preset.seeds:
        for g in stage_ones:
            s1 = STAGE_ONES[g]
            common = ["SEED", str(seed), *preset.extra_opts]
            prefix = f"seed{seed}/{g}"

            def make(method, label, config, opts, **kw):
                return Run(
                    key=f"{prefix}/{method}",
                    seed=seed,
                    stage_one=g,
                    method=method,
                    label=f"{s1.label} {label}",
                    config=os.path.join(SYNTH, config),
                    opts=opts + common,
                    **kw,
                )

            first = make("stage_one", "(stage one)", s1.config, preset.stage_one_opts())
            chain = [first]
            for method, config, what in (
                ("disalign_box_only", s1.disalign_box_only, "DisAlign box-only"),
                ("disalign_box_mask", s1.disalign_box_mask, "DisAlign box+mask"),
            ):
                chain.append(
                    make(
                        method, f"+ {what}", config, preset.stage_two_opts(), weights_from=first.key
                    )
                )
            for kind in ("norcal", "tau_norm"):
                if kind == "tau_norm" and not s1.tau_norm:
                    continue
                for p in preset.posthoc_powers:
                    delta = [*POSTHOC_DELTA, "MODEL.DISALIGN.POSTHOC", kind,
                             "MODEL.DISALIGN.POSTHOC_POWER", repr(float(p))]  # fmt: skip
                    chain.append(
                        make(
                            _posthoc_method(kind, p),
                            f"+ {_posthoc_label(kind, p)}",
                            s1.config,
                            delta,
                            eval_only=True,
                            weights_from=first.key,
                        )
                    )
            for run in chain:
                run.out_dir = os.path.join(out_dir, run.key)
                if run.weights_from:
                    weights = os.path.join(out_dir, run.weights_from, "model_final.pth")
                    run.opts = run.opts + ["MODEL.WEIGHTS", weights]
            chains.append(chain)
    return chains


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


class SubprocessRunner:
    """Runs ``tools/train_net.py`` in a child process, its output in OUT_DIR/stdout.txt.

    Each child gets ``threads`` intra-op threads (OMP/MKL), so that ``jobs`` children side by side
    share the cores instead of oversubscribing them.
    """

    def __init__(self, threads: int):
        self.threads = max(1, int(threads))

    def __call__(self, run: Run) -> int:
        cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), *run.command_args()]
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(self.threads)
        with open(os.path.join(run.out_dir, "stdout.txt"), "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
            try:
                # wait4 gives this child's own CPU time: with runs side by side on a shared
                # machine, CPU seconds size a preset better than wall time does.
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            proc.returncode = os.waitstatus_to_exitcode(status)
            run.cpu_s = usage.ru_utime + usage.ru_stime
            return proc.returncode


class InProcessRunner:
    """Runs ``train_net.main`` in this process (serialised): no interpreter start-up per run, for
    tests and debugging. Datasets given by DATASETS.LVIS_FORMAT in the runs' options work as in a
    child process."""

    _lock = threading.Lock()

    def __init__(self, threads: Optional[int] = None):
        self.threads = threads
        spec = importlib.util.spec_from_file_location(
            "_train_net", os.path.join(ROOT, "tools", "train_net.py")
        )
        self.train_net = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.train_net)

    def __call__(self, run: Run) -> int:
        import torch
        from detectron2.engine import default_argument_parser

        args = default_argument_parser().parse_args(run.command_args())
        with self._lock:
            before = torch.get_num_threads()
            if self.threads:
                torch.set_num_threads(self.threads)
            try:
                self.train_net.main(args)
            except Exception:  # reported like a failed child process
                logger.exception("run %s failed", run.key)
                return 1
            finally:
                torch.set_num_threads(before)
        return 0


def _run_record(run: Run) -> dict:
    """What identifies a run's settings; paths inside the benchmark folder are written relative
    to it, so that a moved or copied benchmark folder is still recognised."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(run.out_dir.rstrip(os.sep))))
    opts = [
        "<out>" + o[len(root) :] if isinstance(o, str) and o.startswith(root + os.sep) else o
        for o in run.opts
    ]
    return {"config": os.path.relpath(run.config, ROOT), "eval_only": run.eval_only, "opts": opts}


def execute(run: Run, runner: Callable[[Run], int], log: Callable[[str], None]) -> None:
    """Run ``run`` unless its results exist; fills status, metrics, wall time."""
    metrics_path = os.path.join(run.out_dir, "metrics_final.json")
    record_path = os.path.join(run.out_dir, "run.json")
    record = _run_record(run)
    if os.path.isfile(record_path):
        with open(record_path) as f:
            old = json.load(f)
        if old != record:
            # Reusing results (or resuming a checkpoint) of another schedule would silently mix
            # two experiments in one table.
            raise SystemExit(
                f"[benchmark] {run.out_dir} holds a run with other settings:\n  was {old}\n  now "
                f"{record}\nUse another --out (or delete that folder)."
            )
    timing_path = os.path.join(run.out_dir, "wall_time.json")
    if os.path.isfile(metrics_path):
        run.status, run.metrics = "reused", load_metrics(metrics_path)
        if os.path.isfile(timing_path):
            with open(timing_path) as f:
                timing = json.load(f)
            run.wall_s, run.cpu_s = timing.get("wall_s"), timing.get("cpu_s")
        log(f"{run.key}: reusing {metrics_path}")
        return
    if run.weights_from:
        weights = run.opts[run.opts.index("MODEL.WEIGHTS") + 1]
        if not os.path.isfile(weights):
            run.status, run.error = "skipped", f"no stage-one weights {weights}"
            log(f"{run.key}: SKIPPED ({run.error})")
            return
    os.makedirs(run.out_dir, exist_ok=True)
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    log(f"{run.key}: started")
    start = time.perf_counter()
    code = runner(run)
    run.wall_s = time.perf_counter() - start
    if code != 0 or not os.path.isfile(metrics_path):
        run.status, run.error = "failed", f"exit {code}; see {run.out_dir}/stdout.txt or log.txt"
        log(f"{run.key}: FAILED after {run.wall_s:.0f} s ({run.error})")
        return
    run.status, run.metrics = "done", load_metrics(metrics_path)
    with open(timing_path, "w") as f:
        # Kept for the timing summary of a resumed benchmark.
        json.dump({"wall_s": run.wall_s, "cpu_s": run.cpu_s}, f)
    log(f"{run.key}: done in {run.wall_s:.0f} s")


def run_scheduled(chains, runner, jobs: int, log) -> None:
    """Run every run on ``jobs`` workers, each as soon as its stage one is available.

    Stage ones go first (in plan order): they are the longest runs and everything else waits for
    them, so this keeps all workers busy until the end. A run whose stage one failed is skipped.
    An error that should stop the benchmark (e.g. a folder holding other settings) stops it.
    """
    runs = [r for c in chains for r in c]
    by_key = {r.key: r for r in runs}
    pending = sorted(runs, key=lambda r: r.weights_from is not None)  # stable: plan order kept
    cond = threading.Condition()
    errors = []

    def next_run():
        # Called with `cond` held. Returns a runnable run, None when nothing is left.
        while True:
            if errors:
                return None
            for i, run in enumerate(pending):
                dep = by_key.get(run.weights_from) if run.weights_from else None
                if dep is not None and dep.status in ("failed", "skipped"):
                    run.status, run.error = "skipped", f"stage one {dep.key} {dep.status}"
                    log(f"{run.key}: SKIPPED ({run.error})")
                    pending.pop(i)
                    break
                if dep is None or dep.status in ("done", "reused"):
                    run.status = "running"
                    return pending.pop(i)
            else:
                if not pending:
                    return None
                cond.wait()

    def worker():
        while True:
            with cond:
                run = next_run()
            if run is None:
                return
            try:
                execute(run, runner, log)
            except BaseException as e:  # SystemExit included: stop scheduling, re-raise below
                run.status, run.error = "failed", str(e)
                with cond:
                    errors.append(e)
            finally:
                with cond:
                    cond.notify_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def _metric(metrics: Optional[dict], task: str, metric: str) -> Optional[float]:
    """One metric of a finished run's ``{task: {metric: value}}``, None if the run is missing or
    the metric undefined."""
    if not metrics:
        return None
    v = metrics.get(task, {}).get(metric)
    # The LVIS API reports -1 (-> -100) for a bucket without ground truth: undefined, not a score.
    if v is None or not math.isfinite(v) or v < 0:
        return None
    return float(v)


def summarise(
    runs: Sequence[Run],
    preset: Preset,
    stage_ones: Sequence[str],
    metrics_of: Optional[Callable[[Run], Optional[dict]]] = None,
) -> List[dict]:
    """One dict per table row: per-seed values, their statistics and, for every method built on a
    stage one, the per-seed gains over that stage one.

    ``metrics_of(run)`` gives a run's ``{task: {metric: value}}`` (default: its
    ``metrics_final.json``, i.e. the evaluation at TEST.DETECTIONS_PER_IMAGE).
    """
    metrics_of = metrics_of or (lambda run: run.metrics)
    by_key = {(r.seed, r.stage_one, r.method): r for r in runs}
    metrics = {k: metrics_of(r) for k, r in by_key.items()}
    rows = []
    for g, method, label in method_rows(stage_ones, preset.posthoc_powers):
        row = {"stage_one": g, "method": method, "label": label, "seeds": list(preset.seeds)}
        row["status"] = [by_key[(s, g, method)].status for s in preset.seeds]
        row["values"], row["stats"], row["gain"] = {}, {}, {}
        for task in TASKS:
            row["values"][task], row["stats"][task], row["gain"][task] = {}, {}, {}
            for m in METRICS:
                vals = [_metric(metrics[(s, g, method)], task, m) for s in preset.seeds]
                row["values"][task][m] = vals
                row["stats"][task][m] = seed_stats(vals)
                if method != "stage_one":
                    base = [_metric(metrics[(s, g, "stage_one")], task, m) for s in preset.seeds]
                    row["gain"][task][m] = gain_stats(vals, base)
        rows.append(row)
    return rows


def stats_table(rows, task) -> str:
    """Markdown: one row per method, ``mean ± std (min–max)`` over seeds for each metric."""
    header = ["method"] + [f"{TASK_LABEL[task]} {m}" for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"]] + [format_stats(row["stats"][task][m]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gain_table(rows, task) -> str:
    """Markdown: per-seed gains over the method's own stage one, flagged when not significant."""
    header = ["method (gain over its stage one)"] + [f"Δ {TASK_LABEL[task]} {m}" for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row["method"] == "stage_one":
            continue
        cells = [row["label"]] + [format_gain(row["gain"][task][m]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _kind(run: Run) -> str:
    if run.method == "stage_one":
        return "stage one (train + eval)"
    return "post-hoc (eval only)" if run.eval_only else "stage two (train + eval)"


def timing_table(runs) -> str:
    """Wall and CPU time per kind of run: the numbers to size schedules and presets with (CPU
    seconds depend much less than wall time on what else the machine is doing)."""
    kinds = OrderedDict()
    for r in runs:
        if r.wall_s is not None:
            kinds.setdefault(_kind(r), []).append(r)
    lines = [
        "| runs | count | wall mean (s) | wall min–max (s) | CPU mean (s) | CPU total (s) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, rs in kinds.items():
        walls = [r.wall_s for r in rs]
        cpus = [r.cpu_s for r in rs if r.cpu_s is not None]
        cpu_mean = f"{sum(cpus) / len(cpus):.0f}" if cpus else "n/a"
        cpu_total = f"{sum(cpus):.0f}" if cpus else "n/a"
        lines.append(
            f"| {kind} | {len(rs)} | {sum(walls) / len(walls):.0f} | {min(walls):.0f}–"
            f"{max(walls):.0f} | {cpu_mean} | {cpu_total} |"
        )
    return "\n".join(lines)


def mean_table(rows) -> str:
    """Compact table of the means (the report's format)."""
    means = []
    for row in rows:
        res = {t: {m: row["stats"][t][m]["mean"] for m in METRICS} for t in TASKS}
        res = {
            t: {m: (float("nan") if v is None else v) for m, v in d.items()} for t, d in res.items()
        }
        means.append((row["label"], res))
    return metrics_table(means)


# --------------------------------------------------------------------------------------------------
# Per-class AP and the plot
# --------------------------------------------------------------------------------------------------


@dataclass
class DatasetInfo:
    """What the per-class analysis needs to know about the benchmark's data."""

    test_name: str
    gt_json: str
    class_names: List[str]
    instance_count: List[int]  # training instances per contiguous class
    frequency: List[str]  # r/c/f per contiguous class (training statistics)
    max_dets: int
    lvis_gt: object = field(default=None, repr=False)


def dataset_info(extra_opts: Sequence[str]) -> DatasetInfo:
    """Test set, its ground truth and the training class statistics of the benchmark's runs."""
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog

    from disalign_det import add_disalign_config
    from disalign_det.data import register_datasets_from_cfg

    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.merge_from_file(os.path.join(SYNTH, STAGE_ONES["softmax"].config))
    cfg.merge_from_list(list(extra_opts))
    register_datasets_from_cfg(cfg)
    test = cfg.DATASETS.TEST[0]
    train = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    return DatasetInfo(
        test_name=test,
        gt_json=MetadataCatalog.get(test).json_file,
        class_names=list(train.thing_classes),
        instance_count=[int(n) for n in train.instance_count],
        frequency=list(train.class_frequency),
        max_dets=int(cfg.TEST.DETECTIONS_PER_IMAGE),
    )


_GT_LOCK = threading.Lock()


def run_per_class_ap(
    run: Run, info: DatasetInfo, task: str, max_dets: Optional[int] = None
) -> Optional[PerClassAP]:
    """Per-class AP (and the LVIS summary) of a finished run, from its saved detections.

    ``max_dets`` (default: the runs' TEST.DETECTIONS_PER_IMAGE) keeps each image's top-``max_dets``
    detections by score, as ``LVISResults`` does. A smaller value equals evaluating the model with
    TEST.DETECTIONS_PER_IMAGE = ``max_dets``: detectron2 applies NMS per class and cuts the
    score-sorted survivors last, so the top-k of the saved list is what the model would return.
    Cached in the run's folder (per_class_<task>[_dets<k>].json), recomputed when the results are
    newer.
    """
    max_dets = info.max_dets if max_dets is None else int(max_dets)
    suffix = "" if max_dets == info.max_dets else f"_dets{max_dets}"
    cache = os.path.join(run.out_dir, f"per_class_{task}{suffix}.json")
    results = os.path.join(run.out_dir, "inference", info.test_name, "lvis_instances_results.json")
    if not os.path.isfile(results):
        return None
    if os.path.isfile(cache) and os.path.getmtime(cache) >= os.path.getmtime(results):
        with open(cache) as f:
            d = json.load(f)
        if d.get("max_dets", max_dets) == max_dets:
            return PerClassAP(
                d["cat_ids"],
                [math.nan if v is None else v for v in d["ap"]],
                d["frequency"],
                d.get("summary", {}),
            )
    with _GT_LOCK:
        if info.lvis_gt is None:
            from lvis import LVIS

            info.lvis_gt = LVIS(info.gt_json)
        pc = lvis_per_class_ap(info.lvis_gt, results, task, max_dets=max_dets)
    with open(cache, "w") as f:
        json.dump(
            {
                "max_dets": max_dets,
                "cat_ids": pc.cat_ids,
                "ap": [None if math.isnan(a) else float(a) for a in pc.ap],
                "frequency": pc.frequency,
                "summary": {k: float(v) for k, v in pc.summary.items()},
            },
            f,
        )
    return pc


def lvis_like_budget(num_classes: int) -> int:
    """Detections per image that give ``num_classes`` classes LVIS v1's share of the per-image
    limit: 300 detections for 1203 classes (0.25 per class), at least 1."""
    return max(1, round(300 * num_classes / 1203))


def budget_metrics(run: Run, info: DatasetInfo, max_dets: int) -> Optional[dict]:
    """``{task: {metric: value in percent}}`` of a finished run re-evaluated at ``max_dets``
    detections per image (see :func:`run_per_class_ap`); -100 where LVIS reports undefined."""
    if not run.metrics:
        return None
    out = {}
    for task in TASKS:
        pc = run_per_class_ap(run, info, task, max_dets=max_dets)
        if pc is None or not pc.summary:
            return None
        out[task] = {m: float(pc.summary[m]) * 100 for m in METRICS if m in pc.summary}
    return out


def per_class_means(runs, info, task, stage_ones, methods=("stage_one", "disalign_box_mask")):
    """{stage one: {method: (K,) AP in percent averaged over seeds (NaN where undefined)}}."""
    import numpy as np

    out = {}
    for g in stage_ones:
        out[g] = {}
        for method in methods:
            aps = []
            for run in runs:
                if run.stage_one == g and run.method == method and run.metrics:
                    pc = run_per_class_ap(run, info, task)
                    if pc is not None:
                        by_id = dict(zip(pc.cat_ids, pc.ap))
                        aps.append(
                            [by_id.get(k + 1, math.nan) for k in range(len(info.class_names))]
                        )
            if aps:
                arr = np.asarray(aps, dtype=float) * 100
                with np.errstate(all="ignore"):
                    valid = (~np.isnan(arr)).sum(0)
                    mean = np.where(valid > 0, np.nansum(arr, 0) / np.maximum(valid, 1), np.nan)
                out[g][method] = {"mean": mean.tolist(), "num_seeds": len(aps)}
    return out


BUCKET_COLOURS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}
BUCKET_NAMES = {"r": "rare", "c": "common", "f": "frequent"}


def plot_per_class(per_class, info: DatasetInfo, task, stage_ones, path, num_seeds) -> None:
    """Per-class AP against training instances (log x), stage one vs DisAlign box+mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(info.instance_count, dtype=float)
    freq = np.asarray(info.frequency)
    fig, axes = plt.subplots(
        1, len(stage_ones), figsize=(5.2 * len(stage_ones), 4.4), sharey=True, squeeze=False
    )
    for ax, g in zip(axes[0], stage_ones):
        # Bucket ranges shaded (buckets are defined on IMAGE counts, so instance-count ranges of
        # neighbouring buckets may overlap slightly: the markers' colours are authoritative).
        for b, colour in BUCKET_COLOURS.items():
            sel = freq == b
            if sel.any():
                lo, hi = counts[sel].min(), counts[sel].max()
                ax.axvspan(lo / 1.15, hi * 1.15, color=colour, alpha=0.08, lw=0)
        s1 = per_class.get(g, {}).get("stage_one")
        s2 = per_class.get(g, {}).get("disalign_box_mask")
        x = np.maximum(counts, 1)
        if s1 is not None:
            y1 = np.asarray(s1["mean"], dtype=float)
            ax.scatter(
                x,
                y1,
                facecolors="none",
                edgecolors=[BUCKET_COLOURS[b] for b in freq],
                s=36,
                label="stage one",
                zorder=3,
            )
        if s2 is not None:
            y2 = np.asarray(s2["mean"], dtype=float)
            ax.scatter(
                x,
                y2,
                c=[BUCKET_COLOURS[b] for b in freq],
                marker="D",
                s=26,
                label="+ DisAlign box+mask",
                zorder=4,
            )
        if s1 is not None and s2 is not None:
            for xi, a, b in zip(x, y1, y2):
                if np.isfinite(a) and np.isfinite(b):
                    ax.plot([xi, xi], [a, b], color="0.5", lw=0.8, zorder=2)
        ax.set_xscale("log")
        ax.set_title(f"{STAGE_ONES[g].label} stage one")
        ax.set_xlabel("training instances of the class (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(f"{TASK_LABEL[task]} AP per class (mean of {num_seeds} seed(s))")
    handles, labels = axes[0][0].get_legend_handles_labels()
    from matplotlib.patches import Patch

    handles += [Patch(color=c, alpha=0.5, label=BUCKET_NAMES[b]) for b, c in BUCKET_COLOURS.items()]
    labels += [BUCKET_NAMES[b] for b in BUCKET_COLOURS]
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def _notes(preset: Preset, stage_ones) -> List[str]:
    notes = []
    if preset.note:
        notes.append(preset.note)
    notes += [
        f"Seeds: {list(preset.seeds)} (cfg.SEED). Cells: mean ± sample std (min–max) over seeds.",
        "Stage one is trained once per seed; every stage-two and post-hoc row of that seed starts "
        "from that same checkpoint. Gains are computed per seed (method − its stage one), then "
        "averaged.",
        "A gain is marked n.s. (not significant) unless every seed's gain has the same sign and "
        "|mean| > std of the per-seed gains; with one seed nothing can be called significant.",
        f"Post-hoc powers (gamma of NorCal, tau of τ-norm) evaluated: "
        f"{', '.join(f'{p:g}' for p in preset.posthoc_powers)}; each is reported in its own row; "
        "none is selected on the val set.",
    ]
    if "cosine" in stage_ones:
        notes.append(
            "τ-norm is skipped on the cosine stage one: its classifier rows are already normalised "
            "(MODEL.DISALIGN.POSTHOC tau_norm is not defined for it)."
        )
    notes.append(
        "APr/APc/APf follow LVIS's buckets of the generated data's train image counts (rare 1-10 "
        "images, common 11-100, frequent > 100); n/a = undefined (bucket absent from val) or "
        "missing run."
    )
    return notes


def budget_section(budget: dict, info: DatasetInfo) -> List[str]:
    """Markdown lines of the tables at the LVIS-like detection budget."""
    k = budget["dets_per_image"]
    rows = budget["rows"]
    return [
        f"## At an LVIS-like detection budget: {k} detections per image",
        "",
        f"LVIS v1 evaluates at most 300 detections per image for 1203 classes (0.25 per class); "
        f"the same share for {len(info.class_names)} classes is {k}. With "
        f"{info.max_dets} detections per image nothing competes for the slots, so a per-class "
        "score calibration can only reorder detections within a class; at the LVIS-like budget it "
        "also decides which classes make the cut, as on LVIS. Same runs, re-evaluated from their "
        f"saved detections (each image's top {k} by score = what TEST.DETECTIONS_PER_IMAGE {k} "
        "returns, since detectron2 cuts after its per-class NMS).",
        "",
        mean_table(rows),
        "",
        f"### Gains at {k} detections per image (box)",
        "",
        gain_table(rows, "bbox"),
        "",
        f"### Gains at {k} detections per image (mask)",
        "",
        gain_table(rows, "segm"),
        "",
    ]


def write_outputs(
    out,
    preset,
    stage_ones,
    runs,
    rows,
    per_class,
    info,
    plot_task,
    wall_s,
    jobs,
    threads,
    load,
    budget=None,
):
    """Write benchmark.md, benchmark.json and benchmark.png into ``out``; returns their paths.

    ``budget``: ``{"dets_per_image": k, "rows": summarise(...) at k}`` or None.
    """
    md_path = os.path.join(out, "benchmark.md")
    json_path = os.path.join(out, "benchmark.json")
    png_path = os.path.join(out, "benchmark.png")
    plot_per_class(per_class, info, plot_task, stage_ones, png_path, len(preset.seeds))

    s1_sched = " ".join(preset.stage_one_opts()[:4])
    s2_sched = " ".join(preset.stage_two_opts()[:4])
    failed = [r for r in runs if r.status in ("failed", "skipped")]
    lines = [
        f"# Long-tail benchmark on `{info.test_name}` ({preset.name} preset)",
        "",
        f"Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by "
        f"`tools/benchmark_longtail.py{' --quick' if preset.name == 'quick' else ''}`; wall time "
        f"{wall_s / 60:.1f} min (this invocation; reused runs cost nothing) on {os.cpu_count()} "
        f"CPU core(s), {jobs} run(s) at a time with {threads} thread(s) each; load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end (more than the runs' {jobs} means "
        "the machine was shared and wall times are inflated).",
        f"Schedules: stage one `{s1_sched}`, stage two `{s2_sched}` (LR steps and warm-up scaled "
        "from the configs).",
        "",
        "## Means" if len(preset.seeds) > 1 else "## Results (ONE seed: no spread)",
        "",
        mean_table(rows),
        "",
    ]
    if len(preset.seeds) > 1:
        lines += [
            "## Box AP over seeds",
            "",
            stats_table(rows, "bbox"),
            "",
            "## Mask AP over seeds",
            "",
            stats_table(rows, "segm"),
            "",
        ]
    lines += [
        "## Gains over the same seed's stage one (box)",
        "",
        gain_table(rows, "bbox"),
        "",
        "## Gains over the same seed's stage one (mask)",
        "",
        gain_table(rows, "segm"),
        "",
    ]
    if budget:
        lines += budget_section(budget, info)
    lines += [
        f"![per-class {TASK_LABEL[plot_task]} AP](benchmark.png)",
        "",
        f"Per-class **{TASK_LABEL[plot_task]}** AP (LVISEval precision averaged over IoU and "
        "recall thresholds) against the class's number of training instances, averaged over "
        "seeds; hollow circles: stage one, diamonds: DisAlign box+mask; colours: LVIS bucket.",
        "",
        "## Run times",
        "",
        timing_table(runs),
        "",
        "## Notes",
        "",
    ]
    lines += [f"* {n}" for n in _notes(preset, stage_ones)]
    if failed:
        lines += ["", "## Missing runs", ""]
        lines += [f"* `{r.key}`: {r.status} ({r.error})" for r in failed]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")

    payload = {
        "preset": preset.name,
        "seeds": list(preset.seeds),
        "stage_one_iters": preset.stage_one_iters,
        "stage_two_iters": preset.stage_two_iters,
        "posthoc_powers": list(preset.posthoc_powers),
        "extra_opts": list(preset.extra_opts),
        "dataset": info.test_name,
        "wall_time_s": wall_s,
        "load_average_start_end": list(load),
        "jobs": jobs,
        "threads_per_run": threads,
        "notes": _notes(preset, stage_ones),
        "rows": rows,
        "dets_per_image": info.max_dets,
        "budget": budget,
        "runs": {
            r.key: {
                "status": r.status,
                "wall_s": r.wall_s,
                "cpu_s": r.cpu_s,
                "out_dir": r.out_dir,
                "command": ["tools/train_net.py", *r.command_args()],
                "metrics": r.metrics,
                "error": r.error,
            }
            for r in runs
        },
        "per_class": {
            "task": plot_task,
            "class_names": info.class_names,
            "train_instance_count": info.instance_count,
            "frequency": info.frequency,
            "ap": per_class,
        },
    }
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1)
    return md_path, json_path, png_path


def run_benchmark(
    preset: Preset,
    out: str,
    *,
    stage_ones: Sequence[str] = tuple(STAGE_ONES),
    jobs: int = 2,
    runner: Optional[Callable[[Run], int]] = None,
    plot_task: str = "segm",
    publish_dir: Optional[str] = None,
    dry_run: bool = False,
    log: Callable[[str], None] = None,
    budget: Optional[int] = None,
) -> dict:
    """Run (or reuse) every run of ``preset`` and write the table, JSON and plot into ``out``.

    ``budget``: detections per image of the second evaluation (None: :func:`lvis_like_budget` of
    the number of classes; 0: none). Returns a dict with ``rows``, ``budget`` (None or
    ``{"dets_per_image", "rows"}``), ``runs``, ``paths`` (md, json, png) and ``wall_s``.
    """
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    log = log or (lambda msg: print(f"[benchmark] {msg}", flush=True))
    out = os.path.abspath(out)
    jobs = max(1, int(jobs))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    chains = build_plan(preset, out, stage_ones)
    runs = [r for c in chains for r in c]
    if dry_run:
        for r in runs:
            print("python tools/train_net.py " + " ".join(r.command_args()))
        return {"runs": runs, "rows": [], "budget": None, "paths": {}, "wall_s": 0.0}
    if preset.name == "quick":
        log("QUICK preset: 1 seed and short schedules; a smoke run, not a result.")
    log(
        f"{len(runs)} runs ({len(chains)} stage ones), {jobs} at a time "
        f"({threads} thread(s) each), results under {out}"
    )
    os.makedirs(out, exist_ok=True)
    run_scheduled(chains, runner or SubprocessRunner(threads), jobs, log)

    info = dataset_info(preset.extra_opts)
    rows = summarise(runs, preset, stage_ones)
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
        load, budget=budget_res,
    )  # fmt: skip
    paths = dict(zip(("md", "json", "png"), paths))
    if publish_dir:
        os.makedirs(publish_dir, exist_ok=True)
        for kind in ("md", "png"):
            dst = os.path.join(publish_dir, f"benchmark.{kind}")
            shutil.copyfile(paths[kind], dst)
            paths[f"published_{kind}"] = dst
    return {"rows": rows, "budget": budget_res, "runs": runs, "paths": paths, "wall_s": wall_s}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default output/benchmark, output/benchmark-quick with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 seed, short schedules: finishes in < 10 min on 2 idle cores",
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
        default=",".join(STAGE_ONES),
        help=f"subset of {','.join(STAGE_ONES)}",
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
        "per 1203 classes scaled to the dataset, 5 for 20 classes; 0: off)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config options appended to every run (KEY VALUE ...)",
    )
    return parser.parse_args(argv)


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
    if args.opts:
        preset = replace(preset, extra_opts=tuple(args.opts))
    return preset


def main(argv=None, runner=None) -> int:
    args = parse_args(argv)
    preset = preset_from_args(args)
    if args.out is None:
        args.out = os.path.join(ROOT, "output", "benchmark-quick" if args.quick else "benchmark")
    stage_ones = [s for s in args.stage_ones.split(",") if s]
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
        publish_dir=os.path.join(ROOT, "docs") if args.publish else None,
        dry_run=args.dry_run,
        budget=args.budget,
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


if __name__ == "__main__":
    sys.exit(main())
