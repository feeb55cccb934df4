"""The "fast" LVIS backend (``disalign_det.evaluation.fast_lvis_eval``) against the LVIS API.

Every comparison is ``==`` on the precision and recall arrays and on the summary, never closeness.
The data are made to hit the API's corner cases: score ties (within an image, a pair and a
category), results not grouped by image, ignored and not-exhaustively annotated objects, objects
of several area ranges in one pair, detections of unverified or unknown categories, boxes without
area or with negative sides, NaN and infinite coordinates, masks whose box area differs from their
pixel area, more detections than the per-image cap.
"""

import disalign_det  # noqa: F401  isort:skip  (compat shims before detectron2 / lvis)

import copy
import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from lvis import LVIS, LVISEval, LVISResults

from disalign_det.evaluation.fast_lvis_eval import FastLVISEval, box_iou
from disalign_det.evaluation.fast_lvis_inputs import GroundTruthArrays, per_image_top
from disalign_det.evaluation.lvis_evaluation import _ShardWriter
from disalign_det.evaluation.shards import BackgroundResultsWriter, write_results_json

H, W = 48, 64
NUM_CATS = 9
FREQ = "rcfrcfrcf"


def _box_rle(x, y, w, h):
    mask = np.zeros((H, W), dtype=np.uint8, order="F")
    x0, y0 = int(max(x, 0)), int(max(y, 0))
    mask[y0 : int(min(y + h, H)), x0 : int(min(x + w, W))] = 1
    rle = mask_utils.encode(mask)
    rle["counts"] = rle["counts"].decode()
    return rle


def _make_gt(path, rng, num_images=12):
    images, anns = [], []
    for image_id in range(1, num_images + 1):
        cats = rng.choice(np.arange(1, NUM_CATS + 1), size=3, replace=False).tolist()
        pos, neg = cats[:2], cats[2:]
        images.append(
            {
                "id": image_id,
                "height": H,
                "width": W,
                "neg_category_ids": neg,
                "not_exhaustive_category_ids": pos[:1] if image_id % 3 == 0 else [],
            }
        )
        for _ in range(int(rng.integers(1, 7))):
            # Sizes straddle the small/medium/large limits (32^2, 96^2) at this image size by
            # scaling areas: several area ranges within one pair.
            w, h = float(rng.integers(3, 30)), float(rng.integers(3, 30))
            x, y = float(rng.integers(0, W - w)), float(rng.integers(0, H - h))
            ann = {
                "id": len(anns) + 1,
                "image_id": image_id,
                "category_id": int(rng.choice(pos)),
                "bbox": [x, y, w, h],
                "area": float(rng.choice([w * h, 30.0**2, 33.0**2, 97.0**2])),
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            }
            if rng.random() < 0.1:
                ann["ignore"] = 1
            anns.append(ann)
    cats = [
        {"id": c, "name": f"c{c}", "frequency": FREQ[c - 1], "image_count": 1, "instance_count": 1}
        for c in range(1, NUM_CATS + 1)
    ]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return LVIS(path)


def _make_results(rng, gt, per_image=25, with_masks=True, ties=True):
    results = []
    anns = gt.dataset["annotations"]
    for img in gt.dataset["images"]:
        own = [a for a in anns if a["image_id"] == img["id"]]
        for k in range(per_image):
            if own and k < 3 * len(own):
                a = own[k % len(own)]
                x, y, w, h = (v + rng.normal(0, 2) for v in a["bbox"])
                cat = a["category_id"] if rng.random() < 0.8 else int(rng.integers(1, NUM_CATS + 1))
            else:
                w, h = rng.uniform(0, 30, 2)
                x, y = rng.uniform(-5, W - 5), rng.uniform(-5, H - 5)
                cat = int(rng.integers(1, NUM_CATS + 3))  # ids 10, 11: unknown categories
            if rng.random() < 0.03:
                w = 0.0  # no area: dropped by the API's area filter
            if rng.random() < 0.03:
                w, h = -w, -h  # negative sides: positive area
            score = float(rng.integers(0, 6) / 5) if ties else float(rng.random())
            r = {"image_id": img["id"], "category_id": cat, "bbox": [x, y, w, h], "score": score}
            if with_masks:
                r["segmentation"] = _box_rle(x, y, abs(w), abs(h))
            results.append(r)
    order = rng.permutation(len(results))  # results of an image not contiguous
    return [results[i] for i in order]


def _task_results(results, task):
    out = copy.deepcopy(results)
    if task == "segm":
        for r in out:
            r.pop("bbox")  # detectron2's mask pass: areas from the masks
    return out


def _stock(gt, results, task, max_dets):
    ev = LVISEval(gt, LVISResults(gt, copy.deepcopy(results), max_dets), task)
    ev.run()
    return ev


def _assert_identical(stock, fast):
    np.testing.assert_array_equal(stock.eval["precision"], fast.eval["precision"])
    np.testing.assert_array_equal(stock.eval["recall"], fast.eval["recall"])
    assert dict(stock.results) == dict(fast.results)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("task", ["bbox", "segm"])
@pytest.mark.parametrize("max_dets", [300, 6, -1])
def test_bit_identical_to_lvis_api_on_corner_cases(tmp_path, seed, task, max_dets):
    rng = np.random.default_rng(seed)
    gt = _make_gt(str(tmp_path / "gt.json"), rng)
    results = _task_results(_make_results(rng, gt), task)
    stock = _stock(gt, results, task, max_dets)
    fast = FastLVISEval.from_results(gt, copy.deepcopy(results), task, max_dets)
    fast.run()
    _assert_identical(stock, fast)
    assert stock.results["AP"] > 0.05  # not a degenerate comparison
    # Some precision entries are -1 (no ground truth), some 0, some in between.
    assert (stock.eval["precision"] == -1).any() and (stock.eval["precision"] > 0).any()


def test_segm_with_boxes_takes_box_areas_as_the_api(tmp_path):
    """Results with "bbox" and "segmentation": LVISResults takes areas from the boxes (w * h,
    not the mask's pixels), also for a mask evaluation."""
    rng = np.random.default_rng(5)
    gt = _make_gt(str(tmp_path / "gt.json"), rng)
    results = _make_results(rng, gt, ties=False)
    stock = _stock(gt, results, "segm", 300)
    fast = FastLVISEval.from_results(gt, copy.deepcopy(results), "segm", 300)
    fast.run()
    _assert_identical(stock, fast)


def test_nan_and_infinite_boxes_match_the_api(tmp_path):
    """Non-finite detection boxes (mostly dropped by the area filter) and a ground-truth box with
    a NaN side: its IoUs are NaN, which pass the API's "<" tests (the detection is matched); such
    a pair takes the literal transcription of the API's loop."""
    rng = np.random.default_rng(7)
    path = str(tmp_path / "gt.json")
    _make_gt(path, rng)
    data = json.load(open(path))
    for ann in data["annotations"][:4]:
        ann["bbox"][2] = float("nan")  # its "area" field stays finite: the API loads it
    with open(path, "w") as f:
        json.dump(data, f)
    gt = LVIS(path)
    results = _make_results(rng, gt, with_masks=False)
    for i, r in enumerate(results[:40]):
        r["bbox"][i % 4] = [np.nan, np.inf, -np.inf][i % 3]
    nan_pairs = {(a["image_id"], a["category_id"]) for a in data["annotations"][:4]}
    assert sum((r["image_id"], r["category_id"]) in nan_pairs for r in results) >= 4
    for max_dets in (300, -1):
        stock = _stock(gt, results, "bbox", max_dets)
        fast = FastLVISEval.from_results(gt, copy.deepcopy(results), "bbox", max_dets)
        fast.run()
        _assert_identical(stock, fast)


def test_equal_ious_the_last_object_wins(tmp_path):
    """A detection exactly between two objects (equal IoUs) takes the later one, as in the API's
    loop; the next detection then matches the earlier one at 0.82 instead of the later at 0.54,
    which moves AP at IoU thresholds 0.55-0.8."""
    path = str(tmp_path / "gt.json")
    img = {
        "id": 1,
        "height": H,
        "width": W,
        "neg_category_ids": [],
        "not_exhaustive_category_ids": [],
    }
    anns = [
        {"id": k + 1, "image_id": 1, "category_id": 1, "bbox": box, "area": 100.0}
        for k, box in enumerate([[10.0, 5.0, 10.0, 10.0], [12.0, 5.0, 10.0, 10.0]])
    ]
    for a in anns:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    cats = [{"id": 1, "name": "c1", "frequency": "f", "image_count": 1, "instance_count": 1}]
    with open(path, "w") as f:
        json.dump({"images": [img], "annotations": anns, "categories": cats}, f)
    gt = LVIS(path)
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [11.0, 5.0, 10.0, 10.0], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [9.0, 5.0, 10.0, 10.0], "score": 0.8},
    ]
    stock = _stock(gt, results, "bbox", 300)
    fast = FastLVISEval.from_results(gt, copy.deepcopy(results), "bbox", 300)
    fast.run()
    _assert_identical(stock, fast)
    assert stock.eval["recall"][:7, 0, 0].tolist() == [1.0] * 7  # both matched up to IoU 0.8


def test_box_iou_is_pycocotools_bit_for_bit():
    rng = np.random.default_rng(3)
    dt = rng.uniform(-10, 60, (500, 4))
    gt = rng.uniform(-10, 60, (7, 4))
    dt[::17, 2] = 0.0
    dt[::13, 3] *= -1
    ours = box_iou(np.repeat(dt, len(gt), 0), np.tile(gt, (len(dt), 1))).reshape(len(dt), -1)
    theirs = mask_utils.iou(dt.tolist(), gt.tolist(), [0] * len(gt))
    np.testing.assert_array_equal(ours, theirs)


def test_per_image_top_is_lvis_results_cut():
    rng = np.random.default_rng(11)
    results = [
        {"image_id": int(i), "score": float(s), "k": k}
        for k, (i, s) in enumerate(zip(rng.integers(1, 6, 400), rng.integers(0, 4, 400)))
    ]
    for max_dets in (0, 1, 7, 79, 500, -1):
        keep = per_image_top(
            np.array([r["image_id"] for r in results]), np.array([r["score"] for r in results]),
            max_dets,
        )  # fmt: skip
        if max_dets >= 0:
            stock = LVISResults.limit_dets_per_image(None, copy.deepcopy(results), max_dets)
        else:
            stock = results
        assert sorted(r["k"] for r in stock) == np.flatnonzero(keep).tolist()


def test_ground_truth_arrays_follow_prepare(tmp_path):
    rng = np.random.default_rng(2)
    gt = _make_gt(str(tmp_path / "gt.json"), rng)
    arrays = GroundTruthArrays.of(gt)
    assert GroundTruthArrays.of(gt) is arrays  # built once per LVIS object
    ev = LVISEval(gt, LVISResults(gt, _make_results(rng, gt, with_masks=False)), "bbox")
    ev._prepare()
    pairs = sorted(ev._gts)
    keys = sorted(
        {ev.params.img_ids.index(i) * NUM_CATS + ev.params.cat_ids.index(c) for i, c in pairs}
    )
    assert np.unique(arrays.key).tolist() == keys
    assert arrays.ignore.sum() == sum(bool(g["ignore"]) for gts in ev._gts.values() for g in gts)
    for img in gt.dataset["images"]:
        expected = set(img["neg_category_ids"]) | {c for i, c in pairs if i == img["id"]}
        assert arrays.verified_cats(img["id"]).tolist() == sorted(expected)
    assert arrays.verified_cats(10**9) is None


def _write_shard(path, results_by_record, with_masks=True):
    writer = _ShardWriter(str(path), None)
    for image_id, records in results_by_record:
        writer.write(image_id, records, with_masks)
    return writer.close()


def _records(results, with_masks):
    """Group results into per-image shard records, in a fixed image order; one image twice."""
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    records = []
    for image_id, rs in sorted(by_image.items()):
        rs = sorted(rs, key=lambda r: -r["score"])  # a detector's order
        if not with_masks:
            rs = [{k: v for k, v in r.items() if k != "segmentation"} for r in rs]
        if image_id == 4:  # processed twice (two records of one image)
            records += [(image_id, rs[:5]), (image_id, rs[5:])]
        else:
            records.append((image_id, rs))
    return records


@pytest.mark.parametrize("task", ["bbox", "segm"])
def test_from_shards_equals_lvis_api_on_the_results_json(tmp_path, task):
    rng = np.random.default_rng(4)
    gt = _make_gt(str(tmp_path / "gt.json"), rng)
    results = _make_results(rng, gt, per_image=40)
    info = _write_shard(tmp_path / "a.lvisdet", _records(results, True))
    with open(tmp_path / "results.json", "w") as f:
        write_results_json([info["path"]], f)
    saved = json.load(open(tmp_path / "results.json"))
    for max_dets in (300, 9):
        stock = _stock(gt, _task_results(saved, task), task, max_dets)
        fast = FastLVISEval.from_shards(gt, [info["path"]], task, max_dets)
        fast.run()
        _assert_identical(stock, fast)
    # Fixed AP's selection: given positions, no per-image cut.
    positions = np.flatnonzero(rng.random(len(saved)) < 0.5)
    kept = [saved[i] for i in positions.tolist()]
    stock = _stock(gt, _task_results(kept, task), task, -1)
    fast = FastLVISEval.from_shards(gt, [info["path"]], task, -1, positions)
    fast.run()
    _assert_identical(stock, fast)


def test_from_shards_mask_pass_skips_images_without_masks(tmp_path):
    rng = np.random.default_rng(6)
    gt = _make_gt(str(tmp_path / "gt.json"), rng)
    records = _records(_make_results(rng, gt, per_image=30), True)
    writer = _ShardWriter(str(tmp_path / "s.lvisdet"), None)
    for n, (image_id, rs) in enumerate(records):
        boxes_only = n % 4 == 1
        if boxes_only:
            rs = [{k: v for k, v in r.items() if k != "segmentation"} for r in rs]
        writer.write(image_id, rs, not boxes_only)
    path = writer.close()["path"]
    segm = [
        {k: v for k, v in r.items() if k != "bbox"}
        for n, (_, rs) in enumerate(records)
        if n % 4 != 1
        for r in rs
    ]
    stock = _stock(gt, segm, "segm", 8)
    fast = FastLVISEval.from_shards(gt, [path], "segm", 8)
    fast.run()
    _assert_identical(stock, fast)


def test_unknown_image_raises_like_lvis_results(tmp_path):
    rng = np.random.default_rng(8)
    gt = _make_gt(str(tmp_path / "gt.json"), rng)
    results = _make_results(rng, gt, with_masks=False)
    results[3]["image_id"] = 999
    with pytest.raises(AssertionError):
        LVISResults(gt, copy.deepcopy(results))
    with pytest.raises(ValueError, match=r"image id\(s\) that the ground truth does not have"):
        FastLVISEval.from_results(gt, results, "bbox")


def test_background_results_json_same_bytes_and_failure_is_loud(tmp_path):
    rng = np.random.default_rng(9)
    gt = _make_gt(str(tmp_path / "gt.json"), rng)
    info = _write_shard(tmp_path / "a.lvisdet", _records(_make_results(rng, gt), True))
    with open(tmp_path / "inline.json", "w") as f:
        write_results_json([info["path"]], f)
    out = str(tmp_path / "background.json")
    BackgroundResultsWriter([info["path"]], out).wait()
    assert open(out).read() == open(tmp_path / "inline.json").read()
    assert json.load(open(out))  # valid, non-empty

    bad = str(tmp_path / "bad.json")
    writer = BackgroundResultsWriter([str(tmp_path / "missing.lvisdet")], bad)
    with pytest.raises(RuntimeError, match="BACKGROUND_RESULTS_JSON"):
        writer.wait()
    assert not os.path.exists(bad)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("bad.json")]
