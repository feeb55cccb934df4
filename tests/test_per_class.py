"""Per-class results of every evaluation: the table's AP equals the LVIS API's AP of each class
evaluated alone, the CSV equals the JSON, tools/train_net.py writes them next to
metrics_final.json (with Fixed AP under the switch), and tools/plot_per_class.py pairs two runs."""

import disalign_det  # noqa: F401  isort:skip  (compat shims before detectron2 / lvis)

import copy
import csv
import json
import math
import os

import numpy as np
import pytest
from conftest import CONFIGS, TINY_CLASSES, load_script
from lvis import LVIS, LVISEval, LVISResults
from test_fixed_ap import _evaluate, _generated, _write_gt

from disalign_det.evaluation import LVIS_METRICS


def _class_alone(gt, results, iou_type, cat, max_dets):
    """The LVIS API's AP of one category, evaluated with only that category (percent)."""
    results = copy.deepcopy(results)
    for r in results:
        r.pop("bbox" if iou_type == "segm" else "segmentation", None)
    ev = LVISEval(gt, LVISResults(gt, results, max_dets=max_dets), iou_type)
    ev.params.cat_ids = [cat]
    ev.run()
    ap = ev.get_results()["AP"]
    return float("nan") if ap == -1 else float(ap * 100)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("per_class")
    images, anns, outputs, freq = _generated(np.random.default_rng(5))
    gt_path = str(tmp / "gt.json")
    _write_gt(gt_path, images, anns, freq)
    results, rows, saved = _evaluate(gt_path, outputs, str(tmp / "out"), k=20, max_dets=10)
    return gt_path, results, rows, saved, str(tmp / "out")


def test_table_ap_equals_each_class_evaluated_alone(evaluated):
    gt_path, results, rows, saved, _ = evaluated
    gt = LVIS(gt_path)
    for task in ("bbox", "segm"):
        for row in rows:
            expected = _class_alone(gt, saved, task, row["category_id"], max_dets=10)
            value = row[f"{task}_AP"]
            assert (value is None and math.isnan(expected)) or value == expected, (task, row)
        # ... and the table averages back to the reported metrics.
        for key, group in (("AP", None), ("APr", "r"), ("APc", "c"), ("APf", "f")):
            vals = [r[f"{task}_AP"] for r in rows if group in (None, r["frequency"])]
            vals = [v for v in vals if v is not None]
            assert np.mean(vals) == pytest.approx(results[task][key], abs=1e-9), (task, key)


def test_table_columns_and_csv(evaluated):
    gt_path, _, rows, _, out = evaluated
    with open(gt_path) as f:
        cats = {c["id"]: c for c in json.load(f)["categories"]}
    assert [r["category_id"] for r in rows] == sorted(cats)
    for r in rows:
        c = cats[r["category_id"]]
        assert (r["name"], r["frequency"]) == (c["name"], c["frequency"])
        # No training metadata given: the json's categories' counts.
        assert r["train_image_count"] == c["image_count"]
        assert r["train_instance_count"] == c["instance_count"]
    with open(os.path.join(out, "per_class_ap.csv")) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(rows[0])
    for r, t in zip(rows, table):
        for k, v in r.items():
            assert t[k] == ("" if v is None else str(v)), (k, r, t)


@pytest.mark.slow
def test_train_net_writes_per_class_and_fixed_ap(tiny_dataset, tmp_path):
    tn = load_script("tools/train_net.py")
    out = str(tmp_path / "run")
    opts = [
        "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(TINY_CLASSES),
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "1", "SOLVER.WARMUP_ITERS", "0",
        "TEST.LVIS_EVAL.FIXED_AP", "True", "TEST.LVIS_EVAL.FIXED_AP_DETS_PER_CLASS", "50",
        "OUTPUT_DIR", out,
    ]  # fmt: skip
    config = os.path.join(CONFIGS, "synthetic", "mask_rcnn_synth.yaml")
    args = tn.default_argument_parser().parse_args(["--config-file", config, *opts])
    cfg = tn.setup(args)
    assert cfg.TEST.DETECTIONS_PER_IMAGE == -1  # the switch removed the per-image cap
    tn.main(args)
    with open(os.path.join(out, "metrics_final.json")) as f:
        final = json.load(f)
    assert set(final) == {"bbox", "segm", "bbox_fixed", "segm_fixed"}
    for task in final:
        assert set(LVIS_METRICS) <= set(final[task])
    with open(os.path.join(out, "per_class_ap.json")) as f:
        rows = json.load(f)
    assert os.path.isfile(os.path.join(out, "per_class_ap.csv"))
    assert len(rows) == TINY_CLASSES
    for col in ("bbox_AP", "segm_AP", "bbox_fixed_AP", "segm_fixed_AP"):
        assert col in rows[0]
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get("tiny_train")
    assert [r["train_instance_count"] for r in rows] == list(meta.instance_count)
    assert [r["train_image_count"] for r in rows] == list(meta.image_count)


def test_plot_two_runs(evaluated, tmp_path):
    _, _, rows, _, out = evaluated
    other = copy.deepcopy(rows)
    for r in other:
        if r["segm_AP"] is not None:
            r["segm_AP"] = r["segm_AP"] + (10.0 if r["frequency"] == "r" else 0.0)
    other_path = str(tmp_path / "other.json")
    with open(other_path, "w") as f:
        json.dump(other, f)
    tool = load_script("tools/plot_per_class.py")
    png = str(tmp_path / "plot.png")
    pairs = tool.main([out, other_path, "--task", "segm", "--out", png])
    assert os.path.getsize(png) > 0
    assert [p[0] for p in pairs] == [r["category_id"] for r in rows]
    means = tool.group_means(pairs)
    assert means["r"][1] - means["r"][0] == pytest.approx(10.0)
    assert means["f"][1] == pytest.approx(means["f"][0])
    with pytest.raises(ValueError, match="'keypoints'"):
        tool.main([out, other_path, "--task", "keypoints", "--out", png])
