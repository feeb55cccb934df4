"""Benchmark tools: per-class AP against the LVIS API, seed statistics, progress, and end-to-end
smoke runs of the long-tail benchmark (the checkout's :mod:`lab`) and
``tools/benchmark_speed.py`` on tiny inputs (no timing checks).
"""

import io
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from common import TINY_CLASSES, tiny_opts
from lvis import LVIS, LVISEval, LVISResults

from disalign_det.evaluation.per_class import lvis_per_class_ap, per_class_ap_from_precision
from lab import longtail, plan, results
from lab.progress import Progress, format_duration
from lab.run import InProcessRunner
from lab.stats import format_gain, format_stats, gain_stats, median, seed_stats

# --------------------------------------------------------------------------------------------------
# Per-class AP
# --------------------------------------------------------------------------------------------------


def _square(x, y, s):
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def _hand_made_gt(path):
    """4 images of 100 x 100, 4 categories: r, c, f with ground truth, and a c one without any."""
    images = [
        {"id": i, "width": 100, "height": 100, "coco_url": f"http://x/val/{i}.jpg",
         "neg_category_ids": [], "not_exhaustive_category_ids": []}
        for i in (1, 2, 3, 4)
    ]  # fmt: skip
    anns = []

    def add(img, cat, x, y, s):
        anns.append({"id": len(anns) + 1, "image_id": img, "category_id": cat, "bbox": [x, y, s, s],
                     "area": s * s, "segmentation": _square(x, y, s)})  # fmt: skip

    add(1, 1, 10, 10, 20)  # rare
    add(2, 2, 10, 10, 40)  # common
    add(3, 2, 50, 50, 30)
    add(3, 3, 0, 0, 50)  # frequent
    add(4, 3, 40, 40, 50)
    cats = [
        {"id": 1, "name": "a", "frequency": "r"},
        {"id": 2, "name": "b", "frequency": "c"},
        {"id": 3, "name": "c", "frequency": "f"},
        {"id": 4, "name": "d", "frequency": "c"},  # no ground truth: AP undefined
    ]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return path


def _det(img, cat, box, score):
    x, y, w, h = box
    return {"image_id": img, "category_id": cat, "bbox": [x, y, w, h], "score": score}


def _hand_made_results():
    return [
        # rare: one detection shifted so that IoU = 16 * 20 / (2 * 400 - 320) = 0.667
        # -> matched at IoU thresholds 0.50, 0.55, 0.60, 0.65 only: AP = 4 / 10.
        _det(1, 1, [14, 10, 20, 20], 0.9),
        # common: both found exactly, a false positive ranked first in between -> AP < 1
        _det(2, 2, [60, 0, 10, 10], 0.95),
        _det(2, 2, [10, 10, 40, 40], 0.9),
        _det(3, 2, [50, 50, 30, 30], 0.8),
        # frequent: both exact, ranked first: AP = 1
        _det(3, 3, [0, 0, 50, 50], 0.99),
        _det(4, 3, [40, 40, 50, 50], 0.98),
        # a detection of the class without ground truth: ignored by LVIS (not in the image's
        # positive or negative categories)
        _det(1, 4, [0, 0, 10, 10], 0.5),
    ]


def test_per_class_ap_from_precision_hand_made_array():
    # T = 2 thresholds, R = 3 recall points, K = 3 categories, A = 2 area ranges
    p = -np.ones((2, 3, 3, 2))
    p[:, :, 0, 0] = [[1.0, 1.0, 0.5], [0.5, 0.0, 0.0]]  # mean 0.5
    p[:, :, 2, 0] = 1.0
    p[:, :, 1, 1] = 0.3  # another area range only: category 1 undefined for "all"
    ap = per_class_ap_from_precision(p)
    assert ap[0] == pytest.approx(0.5) and ap[2] == pytest.approx(1.0) and math.isnan(ap[1])
    # pycocotools layout (T, R, K, A, M): the last max-dets setting is used
    p5 = np.stack([np.zeros_like(p), p], axis=-1)
    np.testing.assert_allclose(per_class_ap_from_precision(p5), ap)
    with pytest.raises(ValueError):
        per_class_ap_from_precision(np.zeros((2, 3)))


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_lvis_per_class_ap_matches_lvis_eval(tmp_path, iou_type):
    gt_path = _hand_made_gt(str(tmp_path / "gt.json"))
    results = _hand_made_results()
    if iou_type == "segm":
        for r in results:
            x, y, w, h = r["bbox"]
            from pycocotools import mask as mask_utils

            rle = mask_utils.frPyObjects(_square(x, y, w), 100, 100)[0]
            rle["counts"] = rle["counts"].decode()
            r["segmentation"] = rle
    pc = lvis_per_class_ap(gt_path, results, iou_type)
    assert pc.cat_ids == [1, 2, 3, 4]
    assert pc.frequency == ["r", "c", "f", "c"]
    assert pc.ap[0] == pytest.approx(0.4)
    assert 0.0 < pc.ap[1] < 1.0
    assert pc.ap[2] == pytest.approx(1.0)
    assert math.isnan(pc.ap[3])

    # The reference: the LVIS API run directly (boxes dropped for segm, as detectron2 does).
    ref_results = [dict(r) for r in results]
    if iou_type == "segm":
        for r in ref_results:
            r.pop("bbox")
    gt = LVIS(gt_path)
    ev = LVISEval(gt, LVISResults(gt, ref_results), iou_type)
    ev.run()
    ref = ev.get_results()
    assert np.nanmean(pc.ap) == pytest.approx(ref["AP"], abs=1e-12)
    for bucket, key in (("r", "APr"), ("c", "APc"), ("f", "APf")):
        assert pc.bucket_mean(bucket) == pytest.approx(ref[key], abs=1e-12)
    assert pc.bucket_mean() == pytest.approx(ref["AP"], abs=1e-12)
    assert pc.summary["AP"] == pytest.approx(ref["AP"])
    assert pc.as_dict()["4"] is None and pc.as_dict()["1"] == pytest.approx(40.0)


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def test_seed_and_gain_stats():
    st = seed_stats([1.0, 2.0, None, 3.0, float("nan")])
    assert st["n"] == 3 and st["mean"] == pytest.approx(2.0) and st["std"] == pytest.approx(1.0)
    assert (st["min"], st["max"]) == (1.0, 3.0)
    assert format_stats(st) == "2.0 ± 1.0 (1.0–3.0)"
    assert seed_stats([5.0])["std"] is None and format_stats(seed_stats([5.0])) == "5.0"
    assert format_stats(seed_stats([])) == "n/a"

    sig = gain_stats([12.0, 13.0, 12.5], [10.0, 10.5, 10.2])  # gains 2.0, 2.5, 2.3
    assert sig["significant"] and sig["mean"] == pytest.approx(2.2667, abs=1e-3)
    assert "n.s." not in format_gain(sig) and format_gain(sig).startswith("+2.3")
    # a gain that changes sign across seeds is inside the spread
    ns = gain_stats([10.5, 9.8, 10.6], [10.0, 10.0, 10.0])
    assert ns["significant"] is False and format_gain(ns).endswith("n.s.")
    # same sign but mean not above the spread
    ns2 = gain_stats([10.1, 13.0, 10.1], [10.0, 10.0, 10.0])
    assert ns2["significant"] is False
    assert gain_stats([11.0], [10.0])["significant"] is None
    assert format_gain(gain_stats([11.0], [10.0])) == "+1.0 (1 seed)"
    with pytest.raises(ValueError):
        gain_stats([1.0], [1.0, 2.0])
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0, 2.0, 3.0]) == 2.5


# --------------------------------------------------------------------------------------------------
# The long-tail benchmark end to end on the tiny dataset
# --------------------------------------------------------------------------------------------------


def _tiny_opts(paths):
    """Every run of the benchmark on the tiny dataset (registered in the runs' own options)."""
    # A barely trained model keeps many detections; pasting their masks dominates the test.
    return tuple(tiny_opts(("tiny_val",), dets_per_image=20, lvis_format=paths))


# Fixed AP's K in the smoke runs: 4 per class over the tiny val set, so the per-class cut is active
# (the LVIS-like default for its 12 images would be 1).
SMOKE_FIXED_K = 4


@pytest.fixture(scope="module")
def longtail_smoke(tiny_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("longtail"))
    # Power 0 makes NorCal and tau-norm the identity: their rows must equal the stage one's,
    # which checks that the eval-only config delta loads the stage-one weights unchanged.
    preset = plan.Preset("smoke", seeds=(0,), stage_one_iters=3, stage_two_iters=2,
                         posthoc_powers=(0.0,), extra_opts=_tiny_opts(tiny_dataset))  # fmt: skip
    runner = InProcessRunner(threads=1)  # one thread: far faster on a busy shared CPU
    res = longtail.run_benchmark(
        preset, out, jobs=1, runner=runner, log=lambda m: None, budget=3, fixed_ap_k=SMOKE_FIXED_K
    )
    return preset, out, runner, res


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_counts_runs_and_estimates_time_left():
    clock, out = _Clock(), io.StringIO()
    progress = Progress(4, stream=out, clock=clock, tty=False)
    assert progress.eta_s() is None  # nothing finished yet: unknown, not zero
    progress.finished(executed=False)  # a reused run costs nothing: no basis for an estimate
    assert progress.eta_s() is None
    clock.t = 60.0
    progress.finished(executed=True)
    # 60 s for the one run that ran, two left.
    assert progress.eta_s() == pytest.approx(120.0)
    progress.log("x: started")
    assert out.getvalue().splitlines() == [
        "[benchmark] progress: 1/4 runs done, elapsed 0s, ETA ?",
        "[benchmark] progress: 2/4 runs done, elapsed 1m00s, ETA 2m00s",
        "[benchmark] x: started",
    ]
    assert "\r" not in out.getvalue()  # plain lines when not a terminal
    clock.t = 90.0
    progress.finished(executed=True)
    progress.finished(executed=True)
    assert progress.eta_s() == 0.0 and out.getvalue().endswith(
        "4/4 runs done, elapsed 1m30s, ETA 0s\n"
    )
    assert format_duration(3725) == "1h02m" and format_duration(None) == "?"


def test_progress_redraws_one_line_on_a_terminal():
    clock, out = _Clock(), io.StringIO()
    progress = Progress(2, stream=out, clock=clock, tty=True)
    clock.t = 10.0
    progress.finished(executed=True)
    progress.log("y: started")
    progress.finished(executed=True)
    text = out.getvalue()
    line1 = "[benchmark] progress: 1/2 runs done, elapsed 10s, ETA 10s"
    # The progress line is cleared before a log line and drawn again after it; the last one ends
    # the line.
    assert text == (
        "\r\033[K"
        + line1
        + "\r\033[K[benchmark] y: started\n"
        + line1
        + "\r\033[K[benchmark] progress: 2/2 runs done, elapsed 10s, ETA 0s\n"
    )


@pytest.mark.slow
def test_longtail_smoke_outputs(longtail_smoke):
    preset, out, _, res = longtail_smoke
    assert [r.status for r in res["runs"]] == ["done"] * len(res["runs"])
    expected = [
        "softmax (stage one)", "softmax + DisAlign box-only", "softmax + DisAlign box+mask",
        "softmax + NorCal γ=0", "softmax + τ-norm τ=0", "softmax + FRACAL λ=2",
        "RFS (stage one)", "RFS + DisAlign box-only", "RFS + DisAlign box+mask",
        "RFS + NorCal γ=0", "RFS + τ-norm τ=0", "RFS + FRACAL λ=2",
        "cosine (stage one)", "cosine + DisAlign box-only", "cosine + DisAlign box+mask",
        "cosine + NorCal γ=0", "cosine + FRACAL λ=2",
    ]  # fmt: skip
    assert [r["label"] for r in res["rows"]] == expected
    assert len(res["runs"]) == len(expected)  # one seed: one run per row, stage one shared

    with open(res["paths"]["md"]) as f:
        md = f.read()
    for label in expected:
        assert f"| {label} |" in md
    assert "τ-norm is skipped on the cosine stage one" in md
    for heading in ("ONE seed", "## Gains over the same seed's stage one (mask)", "benchmark.png",
                    "## Run times"):  # fmt: skip
        assert heading in md

    with open(res["paths"]["json"]) as f:
        data = json.load(f)
    assert [r["label"] for r in data["rows"]] == expected
    for row in data["rows"]:
        for task in ("bbox", "segm"):
            assert row["stats"][task]["AP"]["n"] == 1
            if row["method"] != "stage_one":
                assert row["gain"][task]["AP"]["significant"] is None  # one seed
    pc = data["per_class"]
    assert pc["task"] == "segm" and len(pc["class_names"]) == TINY_CLASSES
    for g in ("softmax", "rfs", "cosine"):
        for method in ("stage_one", "disalign_box_mask"):
            assert len(pc["ap"][g][method]["mean"]) == TINY_CLASSES

    from PIL import Image

    with Image.open(res["paths"]["png"]) as im:
        assert im.size[0] > 300 and im.size[1] > 200


@pytest.mark.slow
def test_longtail_budget_equals_evaluating_at_the_budget(longtail_smoke, tmp_path):
    """The runs are evaluated without a per-image cap (Fixed AP on); re-evaluating their saved
    detections at k per image gives exactly the metrics of running the model with
    TEST.DETECTIONS_PER_IMAGE = k, both for the LVIS-like budget (3) and for the runs' own cap
    (20, the standard tables); the Fixed AP tables are the runs' own bbox_fixed / segm_fixed."""
    _, _, runner, res = longtail_smoke
    budget, fixed = res["budget"], res["fixed_ap"]
    assert budget["dets_per_image"] == 3 and fixed["dets_per_class"] == 4
    for tables in (budget, fixed):
        assert [r["label"] for r in tables["rows"]] == [r["label"] for r in res["rows"]]
    with open(res["paths"]["md"]) as f:
        md = f.read()
    assert "## At an LVIS-like detection budget: 3 detections per image" in md
    assert "### Gains at 3 detections per image (mask)" in md
    assert "## Fixed AP: top 4 detections per class over the test set" in md
    assert "### Fixed AP gains (mask)" in md
    with open(res["paths"]["json"]) as f:
        data = json.load(f)
    assert data["budget"]["dets_per_image"] == 3 and data["dets_per_image"] == 20
    assert data["fixed_ap"]["dets_per_class"] == 4

    def check(row, expected, what):
        for task in ("bbox", "segm"):
            for m in ("AP", "APr", "APc", "APf"):
                got = row["values"][task][m][0]
                want = expected[task][m]
                if want < 0:  # undefined bucket: None in the tables
                    assert got is None, (what, task, m)
                else:
                    assert got == pytest.approx(want, abs=1e-9), (what, task, m)

    for method in ("stage_one", "disalign_box_mask"):
        run = next(r for r in res["runs"] if r.key == f"seed0/softmax/{method}")
        assert run.opts[run.opts.index("TEST.LVIS_EVAL.FIXED_AP") + 1] == "True"
        pick = lambda rows: next(  # noqa: E731
            r for r in rows if r["method"] == method and r["stage_one"] == "softmax"
        )
        fixed_metrics = {t: run.metrics[f"{t}_fixed"] for t in ("bbox", "segm")}
        check(pick(fixed["rows"]), fixed_metrics, (method, "fixed"))
        weights = os.path.join(run.out_dir, "model_final.pth")
        for k, rows in ((3, budget["rows"]), (20, res["rows"])):
            ref = plan.Run(key=f"ref/{method}/{k}", seed=0, stage_one="softmax", method=method,
                           label="", config=run.config,
                           opts=[*run.opts, "MODEL.WEIGHTS", weights, "TEST.LVIS_EVAL.FIXED_AP",
                                 "False", "TEST.DETECTIONS_PER_IMAGE", str(k)],
                           eval_only=True, out_dir=str(tmp_path / f"{method}_{k}"))  # fmt: skip
            assert runner(ref) == 0
            with open(os.path.join(ref.out_dir, "metrics_final.json")) as f:
                check(pick(rows), json.load(f), (method, k))
        # Not vacuous: the run saved more than 20 detections for some image, so both cuts bite.
        results = os.path.join(run.out_dir, "inference", "tiny_val", "lvis_instances_results.json")
        with open(results) as f:
            per_image = Counter(d["image_id"] for d in json.load(f))
        assert max(per_image.values()) > 20, method


def test_lvis_like_fixed_ap_k():
    assert results.lvis_like_fixed_ap_k(19809) == 10000  # LVIS v1 val
    assert results.lvis_like_fixed_ap_k(200) == 101  # lvis_synth_lt_val
    assert results.lvis_like_fixed_ap_k(1) == 1


def test_eval_opts_go_last_on_every_run(tmp_path):
    preset = plan.Preset("t", seeds=(0, 1), stage_one_iters=10, stage_two_iters=4,
                         extra_opts=("TEST.DETECTIONS_PER_IMAGE", "20"))  # fmt: skip
    extra = ["TEST.LVIS_EVAL.FIXED_AP", "True", "TEST.DETECTIONS_PER_IMAGE", "-1"]
    chains = plan.build_plan(preset, str(tmp_path), ["softmax", "cosine"], extra)
    runs = [r for c in chains for r in c]
    assert len(runs) == 2 * (6 + 5)  # softmax / cosine: stage one, 2 DisAlign, post-hoc
    for r in runs:
        args = r.command_args()
        # The eval options come after the preset's (the last value of a key wins in detectron2).
        assert args.index("-1") > args.index("20"), r.key
        assert r.config.startswith(plan.SYNTH) and "synthetic_lt" in plan.SYNTH


def test_lvis_like_budget():
    assert results.lvis_like_budget(1203) == 300
    assert results.lvis_like_budget(20) == 5  # the basic generated dataset
    assert results.lvis_like_budget(60) == 15  # the LVIS-like generated dataset
    assert results.lvis_like_budget(1) == 1


def test_longtail_tables_over_seeds():
    """Statistics and gains over three seeds from made-up metrics (no training)."""
    preset = plan.Preset("t", seeds=(0, 1, 2), stage_one_iters=10, stage_two_iters=5)
    runs = [r for chain in plan.build_plan(preset, "/nonexistent", ["softmax"]) for r in chain]
    base = {0: 10.0, 1: 12.0, 2: 11.0}
    for r in runs:
        # DisAlign box+mask: +2 on every seed (significant); box-only: -1, +1, 0 (not); post-hoc:
        # APr missing on seed 2 (e.g. undefined): statistics over the two others.
        box_only = {0: -1.0, 1: 1.0, 2: 0.0}[r.seed]
        delta = {"stage_one": 0.0, "disalign_box_mask": 2.0, "disalign_box_only": box_only}
        delta = delta.get(r.method, 0.5)
        metrics = {m: base[r.seed] + delta for m in ("AP", "APr", "APc", "APf")}
        if r.eval_only and r.seed == 2:
            metrics["APr"] = -100.0  # the LVIS API's "undefined"
        r.metrics, r.status = {"bbox": dict(metrics), "segm": dict(metrics)}, "done"
    rows = {row["method"]: row for row in results.summarise(runs, preset, ["softmax"])}
    assert rows["stage_one"]["stats"]["bbox"]["AP"]["mean"] == pytest.approx(11.0)
    assert rows["stage_one"]["stats"]["bbox"]["AP"]["std"] == pytest.approx(1.0)
    g = rows["disalign_box_mask"]["gain"]["segm"]["AP"]
    assert g["mean"] == pytest.approx(2.0) and g["std"] == pytest.approx(0.0) and g["significant"]
    g = rows["disalign_box_only"]["gain"]["bbox"]["AP"]
    assert g["mean"] == pytest.approx(0.0) and g["significant"] is False
    assert rows["norcal_1"]["stats"]["bbox"]["APr"]["n"] == 2
    assert rows["norcal_1"]["gain"]["bbox"]["APr"]["n"] == 2
    # Another source of metrics (the budget tables): every value shifted by 1, gains unchanged.
    shifted = {
        (r.seed, r.method): {t: {m: v + 1 for m, v in d.items()} for t, d in r.metrics.items()}
        for r in runs
    }
    other = results.summarise(
        runs, preset, ["softmax"], metrics_of=lambda r: shifted[(r.seed, r.method)]
    )
    other = {row["method"]: row for row in other}
    assert other["stage_one"]["stats"]["bbox"]["AP"]["mean"] == pytest.approx(12.0)
    assert other["disalign_box_mask"]["gain"]["segm"]["AP"]["mean"] == pytest.approx(2.0)
    table = results.gain_table(list(rows.values()), "bbox")
    assert "| softmax + DisAlign box-only | +0.0 ± 1.0 (-1.0–+1.0) n.s. |" in table
    assert "| softmax + DisAlign box+mask | +2.0 ± 0.0 (+2.0–+2.0) |" in table
    assert "11.0 ± 1.0 (10.0–12.0)" in results.stats_table(list(rows.values()), "segm")


@pytest.mark.slow
def test_longtail_posthoc_identity_reproduces_stage_one(longtail_smoke):
    _, _, _, res = longtail_smoke
    rows = {(r["stage_one"], r["method"]): r for r in res["rows"]}
    for g, methods in (("softmax", ("norcal_0", "tau_norm_0")), ("rfs", ("norcal_0",)),
                       ("cosine", ("norcal_0",))):  # fmt: skip
        base = rows[(g, "stage_one")]["values"]
        for m in methods:
            for task in ("bbox", "segm"):
                assert rows[(g, m)]["values"][task] == base[task], (g, m, task)


@pytest.mark.slow
def test_longtail_resumes_and_refuses_other_settings(longtail_smoke):
    preset, out, runner, _ = longtail_smoke
    res = longtail.run_benchmark(preset, out, jobs=2, runner=runner, log=lambda m: None,
                                 stage_ones=("cosine",), fixed_ap_k=SMOKE_FIXED_K)  # fmt: skip
    assert {r.status for r in res["runs"]} == {"reused"}
    other = replace(preset, stage_one_iters=4)
    with pytest.raises(SystemExit, match="other settings"):
        longtail.run_benchmark(other, out, jobs=1, runner=runner, log=lambda m: None,
                               fixed_ap_k=SMOKE_FIXED_K)  # fmt: skip
    # Another Fixed AP setting is another experiment too: refused, not mixed into one table.
    with pytest.raises(SystemExit, match="other settings"):
        longtail.run_benchmark(preset, out, jobs=1, runner=runner, log=lambda m: None,
                               stage_ones=("cosine",), fixed_ap_k=SMOKE_FIXED_K + 1)  # fmt: skip


@pytest.mark.slow
def test_longtail_cli_in_child_processes(longtail_smoke, tmp_path, tiny_dataset):
    """The command line with real train_net.py children: only the missing run is executed."""
    preset, out, _, _ = longtail_smoke
    dst = str(tmp_path / "bench")
    shutil.copytree(os.path.join(out, "seed0", "cosine"), os.path.join(dst, "seed0", "cosine"))
    shutil.rmtree(os.path.join(dst, "seed0", "cosine", "norcal_0"))
    argv = ["--out", dst, "--seeds", "0", "--stage-ones", "cosine", "--stage-one-iters", "3",
            "--stage-two-iters", "2", "--posthoc-powers", "0", "--jobs", "1",
            "--fixed-ap-k", str(SMOKE_FIXED_K), *_tiny_opts(tiny_dataset)]  # fmt: skip
    assert longtail.main(argv) == 0
    with open(os.path.join(dst, "benchmark.json")) as f:
        runs = json.load(f)["runs"]
    assert runs["seed0/cosine/norcal_0"]["status"] == "done"
    assert runs["seed0/cosine/norcal_0"]["cpu_s"] > 0  # the child's own CPU time (wait4)
    assert runs["seed0/cosine/stage_one"]["status"] == "reused"
    assert os.path.isfile(os.path.join(dst, "seed0", "cosine", "norcal_0", "stdout.txt"))


# --------------------------------------------------------------------------------------------------
# tools/benchmark_speed.py with tiny iteration counts (no timing assertions)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("config_set", ["synthetic", "lvis"])
def test_speed_smoke(config_set, tmp_path, capsys):
    from tools import benchmark_speed as bs

    out = str(tmp_path / "speed.json")
    # Small images keep the R50 / 1203-class set quick; one round, one memory iteration.
    argv = ["--config-set", config_set, "--iters", "1", "--warmup", "0", "--mem-iters", "1",
            "--batch", "1", "--size", "64", "--json", out]  # fmt: skip
    assert bs.main(argv) == 0
    text = capsys.readouterr().out
    for _, label, _ in bs.RATIO_ROWS:
        assert f"| {label} |" in text
    for _, label in bs.RAW_ROWS:
        assert f"| {label} |" in text
    with open(out) as f:
        res = json.load(f)["results"][config_set]
    assert set(res["ratios"]) == {key for key, _, _ in bs.RATIO_ROWS}
    for key, value in res["ratios"].items():
        assert math.isfinite(value) and value > 0, (key, value)
    for stage in ("one", "two"):
        assert res["memory"][stage]["training_mb"] > 0
    assert res["batch"] == 1 and res["image_hw"] == [64, 64]


def test_methods_subset_runs_and_reports_only_those_methods(tmp_path):
    """--methods (issue 26's grid): only the chosen methods run, each only where it applies (no
    NorCal on a sigmoid stage one), and the table rows match the runs."""
    preset = plan.Preset("t", seeds=(0,), stage_one_iters=10, stage_two_iters=4,
                         methods=("disalign_box_mask", "norcal", "fracal"))  # fmt: skip
    chains = plan.build_plan(preset, str(tmp_path), ["softmax", "eqlv2"])
    got = {(r.stage_one, r.method) for c in chains for r in c}
    assert got == {
        ("softmax", "stage_one"), ("softmax", "disalign_box_mask"), ("softmax", "norcal_1"),
        ("softmax", "fracal_2"), ("eqlv2", "stage_one"), ("eqlv2", "disalign_box_mask"),
        ("eqlv2", "fracal_2"),
    }  # fmt: skip
    rows = plan.method_rows(["softmax", "eqlv2"], preset.posthoc_powers, preset.methods)
    assert {(g, m) for g, m, _ in rows} == got
    with pytest.raises(SystemExit, match="unknown --methods"):
        longtail.preset_from_args(longtail.parse_args(["--methods", "disalign,norcal"]))
    args = longtail.parse_args(["--methods", "disalign_box_mask,fracal"])
    assert longtail.preset_from_args(args).methods == ("disalign_box_mask", "fracal")
