"""Fixed AP (Dave et al. 2021) from the streaming evaluator equals an independent computation that
follows the protocol of its public reference implementation, on hand-made cases and generated
data, box and mask, AP / APr / APc / APf and per class."""

import disalign_det  # noqa: F401  isort:skip  (compat shims before detectron2 / lvis)

import copy
import json
import math
import os
import uuid
from collections import defaultdict

import numpy as np
import pytest
import torch
from common import tiny_cfg
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from lvis import LVIS, LVISEval, LVISResults

from disalign_det import add_disalign_config
from disalign_det.evaluation import (
    LVIS_METRICS,
    StreamingLVISEvaluator,
    apply_fixed_ap_config,
    build_lvis_evaluator,
)
from disalign_det.evaluation.fixed_ap import FixedAPPruner, PerClassTopK, pruning_before_masks

SIZE = 64


# ------------------------------------------------------------------ the independent reference
def reference_fixed_ap(gt_json, results, iou_type, k):
    """The protocol of large-vocab-devil's Fixed AP, written out plainly: per category, the ``k``
    highest-scoring results (stable sort), then the LVIS API with no per-image limit.

    Returns ({metric: percent}, {category id: percent or NaN}).
    """
    gt = LVIS(gt_json)
    by_cat = defaultdict(list)
    for r in results:
        by_cat[r["category_id"]].append(copy.deepcopy(r))
    kept = []
    for anns in by_cat.values():
        kept.extend(sorted(anns, key=lambda a: a["score"], reverse=True)[:k])
    for r in kept:
        r.pop("bbox" if iou_type == "segm" else "segmentation", None)
    ev = LVISEval(gt, LVISResults(gt, kept, max_dets=-1), iou_type)
    ev.params.max_dets = -1
    ev.run()
    summary = ev.get_results()
    metrics = {m: float(summary[m] * 100) for m in LVIS_METRICS}
    per_class = {}
    for j, cat in enumerate(ev.params.cat_ids):
        p = ev.eval["precision"][:, :, j, 0]
        p = p[p > -1]
        per_class[cat] = float(p.mean() * 100) if p.size else float("nan")
    return metrics, per_class


# ------------------------------------------------------------------ helpers
def _rect_poly(x, y, w, h):
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def _write_gt(path, images, anns, frequencies):
    """images: {id: (neg, not_exhaustive)}; anns: [(image, category, (x, y, w, h))]."""
    gt = {
        "info": {},
        "licenses": [],
        "images": [
            {
                "id": i,
                "height": SIZE,
                "width": SIZE,
                "coco_url": f"http://images.cocodataset.org/val2017/{i:012d}.jpg",
                "neg_category_ids": list(neg),
                "not_exhaustive_category_ids": list(nel),
            }
            for i, (neg, nel) in images.items()
        ],
        "annotations": [
            {
                "id": n + 1,
                "image_id": i,
                "category_id": c,
                "bbox": list(map(float, b)),
                "area": float(b[2] * b[3]),
                "segmentation": [_rect_poly(*b)],
            }
            for n, (i, c, b) in enumerate(anns)
        ],
        "categories": [
            {"id": c + 1, "name": f"class_{c}", "frequency": f, "synset": f"s{c}.n.01",
             "image_count": 10 * (c + 1), "instance_count": 20 * (c + 1)}
            for c, f in enumerate(frequencies)
        ],  # fmt: skip
    }
    with open(path, "w") as f:
        json.dump(gt, f)


def _instances(dets):
    """dets: [(category id, (x, y, w, h), score)] -> Instances with box-shaped masks."""
    n = len(dets)
    boxes = torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h), _ in dets], dtype=torch.float32)
    masks = torch.zeros((n, SIZE, SIZE), dtype=torch.bool)
    for j, (_, (x, y, w, h), _) in enumerate(dets):
        masks[j, int(y) : int(y + h), int(x) : int(x + w)] = True
    return Instances(
        (SIZE, SIZE),
        pred_boxes=Boxes(boxes.reshape(-1, 4)),
        scores=torch.tensor([s for *_, s in dets], dtype=torch.float32),
        pred_classes=torch.tensor([c - 1 for c, *_ in dets], dtype=torch.int64),
        pred_masks=masks,
    )


def _evaluate(gt_path, outputs, out_dir, k, max_dets=300):
    """Run the streaming evaluator with Fixed AP: (results, per-class rows, results json)."""
    name = f"fixed_ap_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).set(json_file=gt_path)
    ev = StreamingLVISEvaluator(
        name,
        tasks=("bbox", "segm"),
        distributed=False,
        output_dir=out_dir,
        max_dets_per_image=max_dets,
        fixed_ap_dets_per_class=k,
        per_class_dir=out_dir,
    )
    ev.reset()
    for image_id, dets in outputs:
        ev.process([{"image_id": image_id}], [{"instances": _instances(dets)}])
    results = ev.evaluate()
    with open(os.path.join(out_dir, "per_class_ap.json")) as f:
        rows = json.load(f)
    with open(os.path.join(out_dir, "lvis_instances_results.json")) as f:
        saved = json.load(f)
    return results, rows, saved


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b


def _assert_equal_to_reference(gt_path, results, rows, saved, k):
    for task in ("bbox", "segm"):
        ref, ref_per_class = reference_fixed_ap(gt_path, saved, task, k)
        ours = results[f"{task}_fixed"]
        assert set(ours) == set(LVIS_METRICS)
        for m in LVIS_METRICS:
            assert _same(ours[m], ref[m]), (task, m, ours[m], ref[m])
        for row in rows:
            value = row[f"{task}_fixed_AP"]
            expected = ref_per_class[row["category_id"]]
            assert (value is None and math.isnan(expected)) or value == expected, (task, row)


# ------------------------------------------------------------------ hand-made cases
B1, B2, FAR = (4, 4, 20, 20), (30, 30, 24, 24), (40, 2, 20, 10)
FREQ = "rcf"
HALF = 100 * 51 / 101  # AP of a class with 2 objects, one found first (101 recall thresholds)


@pytest.fixture
def hand_gt(tmp_path):
    # Image 1: class 1 at B1; image 2: class 1 at B2; image 3: class 3 only (class 1 unverified
    # there); image 4: one class-2 object. Class 2 is negative in image 1.
    images = {1: ((2,), ()), 2: ((), ()), 3: ((), ()), 4: ((), ())}
    anns = [(1, 1, B1), (2, 1, B2), (3, 3, B1), (4, 2, B2)]
    path = str(tmp_path / "gt.json")
    _write_gt(path, images, anns, FREQ)
    return path


def _row(rows, cat):
    return next(r for r in rows if r["category_id"] == cat)


@pytest.mark.parametrize("tp_first", [True, False])
def test_tie_at_the_cut_keeps_the_earlier_result(hand_gt, tmp_path, tp_first):
    # Class 1: a hit in image 1 and a miss in image 2, same score, K = 1. The stable sort keeps the
    # one that comes first in the results: hit first -> 1 of 2 objects found at precision 1, i.e.
    # precision 1 at the 51 of the 101 recall thresholds up to 0.5: AP_1 = 100 * 51 / 101; miss
    # first -> 0.
    hit = (1, [(1, B1, 0.5)])
    miss = (2, [(1, FAR, 0.5)])
    outputs = [hit, miss] if tp_first else [miss, hit]
    results, rows, saved = _evaluate(hand_gt, outputs, str(tmp_path / "out"), k=1)
    _assert_equal_to_reference(hand_gt, results, rows, saved, k=1)
    assert _row(rows, 1)["bbox_fixed_AP"] == pytest.approx(HALF if tp_first else 0.0)


def test_unverified_detections_count_against_the_per_class_budget(hand_gt, tmp_path):
    # Class 1 is neither annotated nor negative in image 3, so its detections there are ignored by
    # LVISEval; but they are among the class's top K, so the hit in image 1 (lower score) is cut.
    outputs = [(1, [(1, B1, 0.5)]), (3, [(1, FAR, 0.9), (3, B1, 0.8)])]
    results, rows, saved = _evaluate(hand_gt, outputs, str(tmp_path / "k1"), k=1)
    _assert_equal_to_reference(hand_gt, results, rows, saved, k=1)
    assert _row(rows, 1)["bbox_fixed_AP"] == 0.0
    results, rows, saved = _evaluate(hand_gt, outputs, str(tmp_path / "k2"), k=2)
    _assert_equal_to_reference(hand_gt, results, rows, saved, k=2)
    assert _row(rows, 1)["bbox_fixed_AP"] == pytest.approx(HALF)


def test_no_per_image_cap(hand_gt, tmp_path):
    # Image 4: four misses of class 2 above its hit. Standard AP at 2 detections per image never
    # sees the hit; Fixed AP does, at precision 1/5 for its only object: AP_2 = 20 at every IoU.
    dets = [(2, FAR, 0.9 - 0.1 * j) for j in range(4)] + [(2, B2, 0.1)]
    results, rows, saved = _evaluate(hand_gt, [(4, dets)], str(tmp_path / "out"), k=100, max_dets=2)
    _assert_equal_to_reference(hand_gt, results, rows, saved, k=100)
    for task in ("bbox", "segm"):
        assert _row(rows, 2)[f"{task}_AP"] == 0.0
        assert _row(rows, 2)[f"{task}_fixed_AP"] == pytest.approx(20.0)


# ------------------------------------------------------------------ generated data
def _generated(rng, num_images=24, frequencies="rrccff"):
    k = len(frequencies)
    images, anns, outputs = {}, [], []
    for i in range(1, num_images + 1):
        objs = []
        for _ in range(int(rng.integers(1, 4))):
            w, h = (int(v) for v in rng.integers(6, 40, 2))
            x, y = int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - h))
            objs.append((int(rng.integers(1, k + 1)), (x, y, w, h)))
        present = {c for c, _ in objs}
        absent = [c for c in range(1, k + 1) if c not in present]
        neg = sorted(int(c) for c in rng.choice(absent, size=min(2, len(absent)), replace=False))
        nel = sorted(present)[:1] if i % 4 == 0 else []
        images[i] = (neg, nel)
        anns += [(i, c, b) for c, b in objs]
        dets = []
        for c, (x, y, w, h) in objs:
            for _ in range(int(rng.integers(0, 3))):
                jx, jy = rng.normal(0, 3, 2)
                cc = c if rng.random() < 0.7 else int(rng.integers(1, k + 1))
                bx, by = float(np.clip(x + jx, 0, SIZE - w)), float(np.clip(y + jy, 0, SIZE - h))
                dets.append((cc, (bx, by, w, h), 0.0))
        for _ in range(int(rng.integers(5, 30))):
            w, h = (int(v) for v in rng.integers(4, 40, 2))
            box = (float(rng.integers(0, SIZE - w)), float(rng.integers(0, SIZE - h)), w, h)
            dets.append((int(rng.integers(1, k + 1)), box, 0.0))
        # Scores on a coarse grid: many ties, also at the per-class cut.
        scores = np.round(rng.random(len(dets)), 1)
        dets = [(c, b, float(s)) for (c, b, _), s in zip(dets, scores)]
        outputs.append((i, dets))
    return images, anns, outputs, frequencies


# The generated-data equality in the fast tier once; the other seeds and cuts with the slow tests.
@pytest.mark.parametrize(
    "seed,k", [(0, 15), pytest.param(1, 40, marks=pytest.mark.slow),
               pytest.param(2, 100000, marks=pytest.mark.slow)],
)  # fmt: skip
def test_generated_data_equals_reference(tmp_path, monkeypatch, seed, k):
    # Small merge chunks: the streamed selection is merged many times, as on LVIS val.
    monkeypatch.setattr(PerClassTopK, "DEFAULT_CHUNK", 7)
    images, anns, outputs, freq = _generated(np.random.default_rng(seed))
    gt_path = str(tmp_path / "gt.json")
    _write_gt(gt_path, images, anns, freq)
    results, rows, saved = _evaluate(gt_path, outputs, str(tmp_path / "out"), k=k)
    _assert_equal_to_reference(gt_path, results, rows, saved, k)
    counts = defaultdict(int)
    for r in saved:
        counts[r["category_id"]] += 1
    if k < 1000:
        assert max(counts.values()) > k  # the cut is active
    for task in ("bbox", "segm"):
        assert not math.isnan(results[f"{task}_fixed"]["AP"])


def test_per_class_top_k_matches_a_stable_sort():
    rng = np.random.default_rng(3)
    cats = rng.integers(0, 5, 500)
    scores = np.round(rng.random(500), 1)
    for k, chunk in ((1, 3), (7, 11), (60, 1000), (1000, 50)):
        top = PerClassTopK(k, chunk=chunk)
        for start in range(0, 500, 17):
            top.add(cats[start : start + 17], scores[start : start + 17])
        expected = []
        for c in range(5):
            idx = [j for j in range(500) if cats[j] == c]
            expected += sorted(idx, key=lambda j: scores[j], reverse=True)[:k]
        assert top.positions().tolist() == sorted(expected), (k, chunk)


# ------------------------------------------------------------------ pruning before the mask head
def _stable_top(entries, n):
    """The first ``n`` of ``entries`` ((key, score) in stream order) by decreasing score, ties in
    stream order: the cut of :class:`PerClassTopK` and of LVISResults' per-image limit."""
    return [key for key, _ in sorted(entries, key=lambda e: -e[1])[:n]]


@pytest.mark.parametrize("k,p", [(1, 1), (7, 10), (40, 3), (500, 500)])
def test_pruner_drops_nothing_any_metric_uses(k, p):
    """Every per-class top k over the stream and every per-image top q <= p are the same
    detections with and without the pruner, ties (scores rounded to 0.05) included."""
    rng = np.random.default_rng(k + p)
    images = []
    for _ in range(40):
        n = int(rng.integers(0, 60))
        images.append((rng.integers(0, 6, n), np.round(rng.random(n) * 20) / 20))
    pruner = FixedAPPruner(k, p)
    full, kept = defaultdict(list), defaultdict(list)  # class -> [((image, index), score)]
    per_image_full, per_image_kept = [], []
    for i, (cats, scores) in enumerate(images):
        mask = pruner.keep(torch.as_tensor(cats), torch.as_tensor(scores, dtype=torch.float32))
        assert mask.dtype == torch.bool and mask.shape == (len(scores),)
        rows = [((i, j), float(np.float32(scores[j])), int(cats[j])) for j in range(len(scores))]
        per_image_full.append([(key, s) for key, s, _ in rows])
        per_image_kept.append([(key, s) for (key, s, _), m in zip(rows, mask.tolist()) if m])
        for (key, s, c), m in zip(rows, mask.tolist()):
            full[c].append((key, s))
            if m:
                kept[c].append((key, s))
    for c in full:
        assert _stable_top(kept[c], k) == _stable_top(full[c], k), c
    for whole, pruned in zip(per_image_full, per_image_kept):
        for q in {1, max(p // 2, 1), p}:
            assert _stable_top(pruned, q) == _stable_top(whole, q)
    assert pruner.num_seen == sum(len(s) for _, s in images)
    assert pruner.num_kept == sum(len(x) for x in per_image_kept)
    if k < 500:  # not vacuous: something was dropped
        assert pruner.num_kept < pruner.num_seen
    else:  # nothing can be dropped while fewer than k of a class were seen
        assert pruner.num_kept == pruner.num_seen


def test_pruner_rejects_non_positive_budgets():
    with pytest.raises(ValueError, match="dets_per_class"):
        FixedAPPruner(0, 300)


def test_pruning_wraps_the_mask_step_and_restores_it():
    class Heads(torch.nn.Module):
        def forward_with_given_boxes(self, features, instances):
            return [len(x) for x in instances]

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.roi_heads = Heads()

    model = Model()
    inst = Instances((8, 8), scores=torch.tensor([0.9, 0.1, 0.8, 0.05]),
                     pred_classes=torch.tensor([0, 0, 1, 1]))  # fmt: skip
    pruner = FixedAPPruner(1, 1)
    with pruning_before_masks(model, pruner):
        # Per image: top 1 (0.9); per class: its best (0.9, 0.8).
        assert model.roi_heads.forward_with_given_boxes(None, [inst]) == [2]
    assert "forward_with_given_boxes" not in vars(model.roi_heads)
    assert model.roi_heads.forward_with_given_boxes(None, [inst]) == [4]
    assert (pruner.num_seen, pruner.num_kept) == (4, 2)


def _evaluate_untrained(tiny_dataset, out, prune):
    from disalign_det.engine import Trainer

    cfg = tiny_cfg(output_dir=str(out), opts=[
        "DATASETS.TEST", "('tiny_val',)", "MODEL.DEVICE", "cpu", "SEED", "3",
        "TEST.LVIS_EVAL.FIXED_AP", "True", "TEST.LVIS_EVAL.FIXED_AP_DETS_PER_CLASS", "4",
        "TEST.LVIS_EVAL.FIXED_AP_PRUNE", str(prune), "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "TEST.LVIS_EVAL.BACKGROUND_RESULTS_JSON", "False",
    ])  # fmt: skip
    apply_fixed_ap_config(cfg)
    torch.manual_seed(3)
    model = Trainer.build_model(cfg)
    metrics = Trainer.test(cfg, model)
    path = os.path.join(str(out), "inference", "tiny_val", "lvis_instances_results.json")
    with open(path) as f:
        return metrics, json.load(f)


@pytest.mark.slow
def test_trainer_prunes_before_the_mask_head_without_changing_a_number(tiny_dataset, tmp_path):
    """An untrained model at score threshold 0 (every class of each of the 64 boxes: 384 > 300
    detections per image, so the per-image cut bites too) evaluated with Fixed AP at K = 4: the
    pruned run saves fewer detections, among them every one Fixed AP and the standard 300 per
    image use, and reports the same metrics."""
    plain, full = _evaluate_untrained(tiny_dataset, tmp_path / "plain", False)
    pruned, kept = _evaluate_untrained(tiny_dataset, tmp_path / "pruned", True)
    assert set(plain) == {"bbox", "segm", "bbox_fixed", "segm_fixed"}
    for task in plain:
        for m, v in plain[task].items():
            assert _same(pruned[task][m], v), (task, m)
    assert 0 < len(kept) < len(full)
    key = lambda r: (r["image_id"], r["category_id"], r["score"], tuple(r["bbox"]))  # noqa: E731
    kept_keys = {key(r) for r in kept}
    by_class, by_image = defaultdict(list), defaultdict(list)
    for r in full:
        by_class[r["category_id"]].append((key(r), r["score"]))
        by_image[r["image_id"]].append((key(r), r["score"]))
    assert max(len(v) for v in by_image.values()) > 300
    needed = [x for v in by_class.values() for x in _stable_top(v, 4)]
    needed += [x for v in by_image.values() for x in _stable_top(v, 300)]
    assert set(needed) <= kept_keys


# ------------------------------------------------------------------ the config switch
def _cfg(*opts):
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.merge_from_list(list(opts))
    return cfg


def test_switch_removes_the_standard_per_image_cap():
    assert apply_fixed_ap_config(_cfg()).TEST.DETECTIONS_PER_IMAGE == 100  # off: unchanged
    for cap in (100, 300):
        cfg = _cfg("TEST.LVIS_EVAL.FIXED_AP", True, "TEST.DETECTIONS_PER_IMAGE", cap)
        assert apply_fixed_ap_config(cfg).TEST.DETECTIONS_PER_IMAGE == -1
    for cap in (-1, 5000):
        cfg = _cfg("TEST.LVIS_EVAL.FIXED_AP", True, "TEST.DETECTIONS_PER_IMAGE", cap)
        assert apply_fixed_ap_config(cfg).TEST.DETECTIONS_PER_IMAGE == cap


def test_switch_conflicts_name_the_keys():
    cfg = _cfg("TEST.LVIS_EVAL.FIXED_AP", True, "TEST.DETECTIONS_PER_IMAGE", 50)
    with pytest.raises(ValueError, match="TEST.DETECTIONS_PER_IMAGE=50"):
        apply_fixed_ap_config(cfg)
    cfg = _cfg("TEST.LVIS_EVAL.FIXED_AP", True, "TEST.LVIS_EVAL.FIXED_AP_DETS_PER_CLASS", 0)
    with pytest.raises(ValueError, match="FIXED_AP_DETS_PER_CLASS"):
        apply_fixed_ap_config(cfg)


def test_evaluator_refuses_a_capped_model(hand_gt):
    name = f"fixed_cfg_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).set(json_file=hand_gt)
    cfg = _cfg("TEST.LVIS_EVAL.FIXED_AP", True, "TEST.DETECTIONS_PER_IMAGE", 300)
    with pytest.raises(ValueError, match="TEST.LVIS_EVAL.FIXED_AP"):
        build_lvis_evaluator(cfg, name)
    apply_fixed_ap_config(cfg)
    ev = build_lvis_evaluator(cfg, name)
    assert ev._fixed_k == 10000 and ev._max_dets_per_image == 300
