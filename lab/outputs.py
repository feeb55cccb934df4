"""The benchmark's outputs: ``benchmark.md`` (tables, run times, notes), ``benchmark.json`` (every
number, per seed) and ``benchmark.png`` (the per-class plot)."""

import datetime
import json
import os
from typing import List

from .plan import METHODS, TASK_LABEL, Preset
from .plot import plot_per_class
from .results import DatasetInfo, gain_table, mean_table, stats_table, timing_table

__all__ = ["budget_section", "fixed_ap_section", "write_outputs"]


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
    if tuple(preset.methods) != METHODS:
        notes.append(
            f"Methods run on each stage one (--methods): {', '.join(preset.methods)}; the others "
            f"({', '.join(m for m in METHODS if m not in preset.methods)}) were not run."
        )
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


def _tables_section(title: str, intro: str, rows, gains: str) -> List[str]:
    """Markdown lines of one more evaluation of the same runs: its means, then its gains."""
    lines = [f"## {title}", "", intro, "", mean_table(rows), ""]
    for task in ("bbox", "segm"):
        lines += [f"### {gains} ({TASK_LABEL[task]})", "", gain_table(rows, task), ""]
    return lines


def budget_section(budget: dict, info: DatasetInfo) -> List[str]:
    """Markdown lines of the tables at the LVIS-like detection budget."""
    k = budget["dets_per_image"]
    intro = (
        f"LVIS v1 evaluates at most 300 detections per image for 1203 classes (0.25 per class); "
        f"the same share for {len(info.class_names)} classes is {k}. With "
        f"{info.max_dets} detections per image nothing competes for the slots, so a per-class "
        "score calibration can only reorder detections within a class; at the LVIS-like budget it "
        "also decides which classes make the cut, as on LVIS. Same runs, re-evaluated from their "
        f"saved detections (each image's top {k} by score = what TEST.DETECTIONS_PER_IMAGE {k} "
        "returns, since detectron2 cuts after its per-class NMS)."
    )
    title = f"At an LVIS-like detection budget: {k} detections per image"
    return _tables_section(title, intro, budget["rows"], f"Gains at {k} detections per image")


def fixed_ap_section(fixed_ap: dict, info: DatasetInfo) -> List[str]:
    """Markdown lines of the Fixed AP tables (Dave et al. 2021)."""
    k = fixed_ap["dets_per_class"]
    intro = (
        'Fixed AP (Dave et al. 2021, "Evaluating Large-Vocabulary Object Detectors: The Devil is '
        'in the Details") keeps the K best detections of each class over the whole test set '
        "instead of a per-image cap, so re-scaling scores across classes cannot change it unless "
        "a class's own ranking changes. LVIS v1 uses K = 10,000 for its 19,809 val images; the "
        f"same share for {info.num_test_images} images is K = {k} "
        f"(TEST.LVIS_EVAL.FIXED_AP_DETS_PER_CLASS {k}). Same runs: each was evaluated with "
        "TEST.LVIS_EVAL.FIXED_AP True (no per-image cap; the tables above come from the same "
        f"detections cut to {info.max_dets} per image)."
    )
    title = f"Fixed AP: top {k} detections per class over the test set, no per-image cap"
    return _tables_section(title, intro, fixed_ap["rows"], "Fixed AP gains")


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
    fixed_ap=None,
):
    """Write benchmark.md, benchmark.json and benchmark.png into ``out``; returns their paths.

    ``budget``: ``{"dets_per_image": k, "rows": summarise(...) at k}`` or None; ``fixed_ap``:
    ``{"dets_per_class": K, "rows": summarise(...) of Fixed AP}`` or None.
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
    if fixed_ap:
        lines += fixed_ap_section(fixed_ap, info)
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
        "fixed_ap": fixed_ap,
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
