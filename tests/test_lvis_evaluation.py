"""StreamingLVISEvaluator reports exactly what detectron2's LVISEvaluator and the LVIS API do."""

import disalign_det  # noqa: F401  isort:skip  (compat shims before detectron2 / lvis)

import copy
import json
import math
import os
import tempfile
import uuid
import warnings

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.evaluation import LVISEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Boxes, Instances
from lvis import LVIS, LVISEval, LVISResults

from disalign_det.compat import features
from disalign_det.evaluation import (
    LVIS_METRICS,
    LeanLVISEval,
    StreamingLVISEvaluator,
    build_lvis_evaluator,
)
from disalign_det.evaluation import lvis_evaluation as streaming_module

NUM_IMAGES = 30
NUM_CLASSES = 10
HEIGHT, WIDTH = 120, 160
FREQUENCIES = "rrcccffff" + "f"  # rare, common and frequent groups all present


def _make_gt(rng):
    """A small LVIS-format ground truth with polygons, negative and not-exhaustive categories."""
    categories = [
        {"id": c + 1, "name": f"class_{c}", "frequency": FREQUENCIES[c], "synset": f"s{c}.n.01"}
        for c in range(NUM_CLASSES)
    ]
    images, annotations, layout = [], [], {}
    for image_id in range(1, NUM_IMAGES + 1):
        boxes = []
        for _ in range(int(rng.integers(1, 5))):
            w, h = int(rng.integers(6, 120)), int(rng.integers(6, 100))
            x, y = int(rng.integers(0, WIDTH - w)), int(rng.integers(0, HEIGHT - h))
            cat = int(rng.integers(1, NUM_CLASSES + 1))
            boxes.append((cat, x, y, w, h))
            # A diamond-ish polygon inside the box: mask area differs from box area.
            poly = [x + w / 2, y, x + w, y + h / 2, x + w / 2, y + h, x, y + h / 2]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": w * h / 2,
                    "segmentation": [poly],
                }
            )
        present = {b[0] for b in boxes}
        absent = [c for c in range(1, NUM_CLASSES + 1) if c not in present]
        neg = sorted(int(c) for c in rng.choice(absent, size=2, replace=False))
        not_exhaustive = sorted(present)[:1] if image_id % 3 == 0 else []
        images.append(
            {
                "id": image_id,
                "height": HEIGHT,
                "width": WIDTH,
                "coco_url": f"http://images.cocodataset.org/val2017/{image_id:012d}.jpg",
                "neg_category_ids": neg,
                "not_exhaustive_category_ids": not_exhaustive,
            }
        )
        layout[image_id] = (boxes, neg)
    gt = {
        "info": {},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    return gt, layout


def _diamond(w, h):
    """A filled diamond in a w x h box, close to the ground-truth polygons' shape."""
    yy, xx = np.mgrid[0:h, 0:w]
    inside = np.abs(xx + 0.5 - w / 2) / (w / 2) + np.abs(yy + 0.5 - h / 2) / (h / 2) <= 1
    return torch.from_numpy(inside)


def _make_outputs(rng, layout, dets_per_image=25):
    """Per image, ``Instances`` around the ground truth, with some tied scores on purpose."""
    inputs_outputs = []
    for image_id, (boxes, neg) in layout.items():
        pred_boxes, scores, classes = [], [], []
        masks = torch.zeros(dets_per_image, HEIGHT, WIDTH, dtype=torch.bool)
        for k in range(dets_per_image):
            if k < 2 * len(boxes):
                cat, x, y, w, h = boxes[k % len(boxes)]
                x = int(np.clip(x + rng.integers(-3, 4), 0, WIDTH - 2))
                y = int(np.clip(y + rng.integers(-3, 4), 0, HEIGHT - 2))
                w = int(np.clip(w + rng.integers(-3, 4), 1, WIDTH - x))
                h = int(np.clip(h + rng.integers(-3, 4), 1, HEIGHT - y))
                if rng.random() < 0.2:
                    cat = int(rng.integers(1, NUM_CLASSES + 1))
            else:
                cat = int(rng.choice(neg)) if rng.random() < 0.5 else int(rng.integers(1, 11))
                w, h = int(rng.integers(2, 80)), int(rng.integers(2, 60))
                x, y = int(rng.integers(0, WIDTH - w)), int(rng.integers(0, HEIGHT - h))
            pred_boxes.append([x, y, x + w, y + h])
            # Quantised scores: ties exercise the stable ordering of both evaluators.
            scores.append(float(rng.integers(1, 8)) / 8)
            classes.append(cat - 1)
            masks[k, y : y + h, x : x + w] = _diamond(w, h)
        instances = Instances(
            (HEIGHT, WIDTH),
            pred_boxes=Boxes(torch.tensor(pred_boxes, dtype=torch.float32)),
            scores=torch.tensor(scores, dtype=torch.float32),
            pred_classes=torch.tensor(classes, dtype=torch.int64),
            pred_masks=masks,
        )
        inputs_outputs.append(({"image_id": image_id}, {"instances": instances}))
    return inputs_outputs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A registered dataset name, its GT json path and generated model outputs."""
    rng = np.random.default_rng(0)
    gt, layout = _make_gt(rng)
    path = tmp_path_factory.mktemp("lvis_gt") / "gt.json"
    path.write_text(json.dumps(gt))
    name = f"lvis_eval_test_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).set(
        json_file=str(path), thing_classes=[c["name"] for c in gt["categories"]]
    )
    return name, str(path), _make_outputs(rng, layout)


def _run(evaluator, inputs_outputs):
    evaluator.reset()
    for inp, out in inputs_outputs:
        evaluator.process([inp], [out])
    return evaluator.evaluate()


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for task in a:
        assert list(a[task]) == list(b[task]) == list(LVIS_METRICS)
        for key in LVIS_METRICS:
            x, y = a[task][key], b[task][key]
            assert (math.isnan(x) and math.isnan(y)) or x == y, (task, key, x, y)


def _lvis_api_direct(json_file, inputs_outputs, max_dets):
    """The LVIS API run by hand on the instances_to_coco_json of the outputs."""
    results = []
    for inp, out in inputs_outputs:
        for r in instances_to_coco_json(out["instances"], inp["image_id"]):
            r["category_id"] += 1
            results.append(r)
    metrics = {}
    for task in ("bbox", "segm"):
        task_results = copy.deepcopy(results)
        if task == "segm":
            for r in task_results:
                r.pop("bbox")
        gt = LVIS(json_file)
        lvis_eval = LVISEval(gt, LVISResults(gt, task_results, max_dets=max_dets), task)
        lvis_eval.run()
        summary = lvis_eval.get_results()
        metrics[task] = {k: float(summary[k] * 100) for k in LVIS_METRICS}
    return metrics


@pytest.mark.parametrize("max_dets", [None, 7])
def test_same_metrics_and_json_as_stock_and_lvis_api(dataset, tmp_path, max_dets):
    name, json_file, inputs_outputs = dataset
    kwargs = {}
    if max_dets is not None:
        if not features.lvis_evaluator_takes_max_dets():
            pytest.skip("installed LVISEvaluator has no max_dets_per_image to compare with")
        kwargs["max_dets_per_image"] = max_dets
    stock = _run(
        LVISEvaluator(name, distributed=False, output_dir=str(tmp_path / "stock"), **kwargs),
        inputs_outputs,
    )
    ours = _run(
        StreamingLVISEvaluator(
            name, distributed=False, output_dir=str(tmp_path / "ours"), **kwargs
        ),
        inputs_outputs,
    )
    direct = _lvis_api_direct(json_file, inputs_outputs, max_dets or 300)

    assert set(ours) == {"bbox", "segm"}
    _assert_same(ours, stock)
    _assert_same(ours, direct)
    # Not a degenerate comparison: the synthetic predictions do hit the ground truth.
    assert ours["bbox"]["AP"] > 1 and ours["segm"]["AP"] > 1

    results_file = "lvis_instances_results.json"
    stock_json = (tmp_path / "stock" / results_file).read_bytes()
    assert (tmp_path / "ours" / results_file).read_bytes() == stock_json
    # Shards are deleted once evaluated (their shared directory stays).
    assert list((tmp_path / "ours" / "lvis_eval_shards").iterdir()) == []


@pytest.mark.parametrize("child_fails", [False, True])
def test_fast_backend_and_background_json_match_stock(
    dataset, tmp_path, monkeypatch, caplog, child_fails
):
    """The config's evaluator choice (fast metrics, results json from a child process) gives the
    stock evaluator's metrics and json bytes; a failing child is replaced by an in-process
    write (same bytes, no temporary file left)."""
    from disalign_det.evaluation import shards

    name, _, inputs_outputs = dataset
    stock = _run(
        LVISEvaluator(name, distributed=False, output_dir=str(tmp_path / "stock")), inputs_outputs
    )
    started = []

    def writer(paths, out_path):
        started.append(out_path)
        missing = [str(tmp_path / "missing.lvisdet")] if child_fails else paths
        return shards.BackgroundResultsWriter(missing, out_path)

    monkeypatch.setattr(streaming_module, "BackgroundResultsWriter", writer)
    out = tmp_path / "fast"
    ours = _run(
        StreamingLVISEvaluator(
            name,
            distributed=False,
            output_dir=str(out),
            backend="fast",
            background_results_json=True,
        ),
        inputs_outputs,
    )
    _assert_same(ours, stock)
    results_file = "lvis_instances_results.json"
    assert started == [str(out / results_file)]
    assert (out / results_file).read_bytes() == (tmp_path / "stock" / results_file).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["lvis_eval_shards", results_file]
    assert ("in this process instead" in caplog.text) == child_fails


def _compare_with_stock(name, inputs_outputs, max_dets=None):
    kwargs = {}
    if max_dets is not None:
        if not features.lvis_evaluator_takes_max_dets():
            pytest.skip("installed LVISEvaluator has no max_dets_per_image to compare with")
        kwargs["max_dets_per_image"] = max_dets
    stock = _run(LVISEvaluator(name, distributed=False, **kwargs), inputs_outputs)
    ours = _run(StreamingLVISEvaluator(name, distributed=False, **kwargs), inputs_outputs)
    _assert_same(ours, stock)
    return ours


def test_image_processed_twice_matches_stock(dataset):
    """An image split over two process() calls: the top-k cut must see both halves together."""
    name, _, inputs_outputs = dataset
    twice = []
    for inp, out in inputs_outputs:
        instances = out["instances"]
        twice.append((inp, {"instances": instances[:12]}))
        twice.append((inp, {"instances": instances[12:]}))
    # Interleave so that an image's halves are not adjacent in the gathered stream.
    twice = twice[0::2] + twice[1::2]
    _compare_with_stock(name, twice, max_dets=15)


def test_only_unevaluable_detections_match_stock(dataset):
    """Every detection is of a category LVIS does not evaluate for its image: AP 0, not NaN."""
    name, json_file, inputs_outputs = dataset
    with open(json_file) as f:
        gt = json.load(f)
    verified = {img["id"]: set(img["neg_category_ids"]) for img in gt["images"]}
    for ann in gt["annotations"]:
        verified[ann["image_id"]].add(ann["category_id"])
    unevaluable = []
    for inp, out in inputs_outputs:
        free = [c for c in range(1, NUM_CLASSES + 1) if c not in verified[inp["image_id"]]]
        instances = copy.deepcopy(out["instances"])
        instances.pred_classes = torch.full_like(instances.pred_classes, free[0] - 1)
        unevaluable.append((inp, {"instances": instances}))
    ours = _compare_with_stock(name, unevaluable)
    assert ours["bbox"]["AP"] == 0.0


def test_lean_lvis_eval_matches_stock_lvis_eval(dataset):
    _, json_file, inputs_outputs = dataset
    results = [
        r for inp, out in inputs_outputs for r in instances_to_coco_json(out["instances"], 1)
    ]
    for r in results:
        r["category_id"] += 1
    for task in ("bbox", "segm"):
        runs = []
        for cls in (LVISEval, LeanLVISEval):
            gt = LVIS(json_file)
            lvis_eval = cls(gt, LVISResults(gt, copy.deepcopy(results)), task)
            lvis_eval.run()
            runs.append(lvis_eval)
        stock, lean = runs
        np.testing.assert_array_equal(stock.eval["precision"], lean.eval["precision"])
        np.testing.assert_array_equal(stock.eval["recall"], lean.eval["recall"])
        assert dict(stock.results) == dict(lean.results)
        # The point of LeanLVISEval: no entry per empty (image, category) pair.
        assert len(lean.ious) < len(stock.ious)


def test_two_simulated_ranks_equal_single_process(dataset):
    name, _, inputs_outputs = dataset
    single = _run(StreamingLVISEvaluator(name, distributed=False), inputs_outputs)

    ranks = [StreamingLVISEvaluator(name, distributed=False) for _ in range(2)]
    for evaluator in ranks:
        evaluator.reset()
    for i, (inp, out) in enumerate(inputs_outputs):
        ranks[i % 2].process([inp], [out])
    infos = [evaluator.close_shard() for evaluator in ranks]
    assert sum(i["num_images"] for i in infos) == NUM_IMAGES
    results = ranks[0].evaluate_shards(infos)
    _assert_same(results, single)
    # Shards and their temporary directories are gone.
    assert not any(os.path.exists(os.path.dirname(i["path"])) for i in infos)


def _gloo_worker(rank, world_size, init_file, name, json_file, inputs_outputs, force_fallback, out):
    import torch.distributed as dist
    from detectron2.data import MetadataCatalog

    # (disalign_det's shims: already applied by this module's import in the spawned child)
    from disalign_det.evaluation import StreamingLVISEvaluator, lvis_evaluation

    MetadataCatalog.get(name).set(json_file=json_file)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    if force_fallback and rank == 0:
        # Pretend rank 1 lives on another machine: rank 0 "cannot see" its shard.
        def readable(info):
            return info["rank"] == 0

        lvis_evaluation._shard_is_readable = readable
    try:
        evaluator = StreamingLVISEvaluator(name, distributed=True)
        evaluator.reset()
        for inp, o in inputs_outputs[rank::world_size]:
            evaluator.process([inp], [o])
        results = evaluator.evaluate()
        if rank == 0:
            torch.save(results, out)
        else:
            assert results is None
        # Rank 1 is done long before rank 0; tearing gloo down while the peer is still busy
        # occasionally aborts in gloo's C++ ("terminate called without an active exception").
        dist.barrier()
        with open(f"{out}.rank{rank}.done", "w"):  # both ranks' work is complete past here
            pass
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("force_fallback", [False, True])
def test_two_gloo_ranks_equal_single_process(dataset, tmp_path, force_fallback):
    import torch.multiprocessing as mp

    name, json_file, inputs_outputs = dataset
    single = _run(StreamingLVISEvaluator(name, distributed=False), inputs_outputs)
    out = str(tmp_path / "results.pth")
    try:
        mp.spawn(
            _gloo_worker,
            args=(2, str(tmp_path / "init"), name, json_file, inputs_outputs, force_fallback, out),
            nprocs=2,
        )
    except mp.ProcessExitedException as e:
        # Still seen about once in a dozen CI runs despite the barrier: gloo's C++ aborts while
        # the process group is torn down. Tolerated only when it comes after both ranks passed
        # the final barrier (their markers exist): the evaluation itself has finished on both,
        # and its result is checked below exactly as without the abort.
        done = all(os.path.exists(f"{out}.rank{r}.done") for r in range(2))
        if not (done and e.signal_name == "SIGABRT"):
            raise
        warnings.warn(f"gloo aborted during teardown, after both ranks finished: {e}")
    _assert_same(torch.load(out, weights_only=False), single)


def _empty_outputs(with_masks):
    outputs = []
    for image_id in range(1, 6):
        fields = {
            "pred_boxes": Boxes(torch.zeros(0, 4)),
            "scores": torch.zeros(0),
            "pred_classes": torch.zeros(0, dtype=torch.int64),
        }
        if with_masks:
            fields["pred_masks"] = torch.zeros(0, HEIGHT, WIDTH, dtype=torch.bool)
        outputs.append(
            ({"image_id": image_id}, {"instances": Instances((HEIGHT, WIDTH), **fields)})
        )
    return outputs


@pytest.mark.parametrize("with_masks", [True, False])
def test_model_that_predicts_nothing_reports_nan(dataset, tmp_path, with_masks):
    name = dataset[0]
    evaluator = StreamingLVISEvaluator(name, distributed=False, output_dir=str(tmp_path))
    results = _run(evaluator, _empty_outputs(with_masks))
    tasks = {"bbox", "segm"} if with_masks else {"bbox"}
    assert set(results) == tasks
    for task in tasks:
        assert list(results[task]) == list(LVIS_METRICS)
        assert all(math.isnan(v) for v in results[task].values())
    assert (tmp_path / "lvis_instances_results.json").read_text() == "[]"


def test_explicit_tasks_and_no_images(dataset):
    name = dataset[0]
    evaluator = StreamingLVISEvaluator(name, tasks=("bbox", "segm"), distributed=False)
    results = _run(evaluator, _empty_outputs(with_masks=False))
    assert set(results) == {"bbox", "segm"}
    assert all(math.isnan(v) for task in results.values() for v in task.values())
    # Nothing processed at all: like the stock evaluator, an empty dict.
    assert _run(StreamingLVISEvaluator(name, distributed=False), []) == {}


def test_build_lvis_evaluator_ties_max_dets_to_config(dataset):
    cfg = get_cfg()
    cfg.TEST.DETECTIONS_PER_IMAGE = 123
    cfg.MODEL.MASK_ON = True
    with tempfile.TemporaryDirectory() as out:
        evaluator = build_lvis_evaluator(cfg, dataset[0], out)
        assert isinstance(evaluator, StreamingLVISEvaluator)
        assert evaluator._max_dets_per_image == 123
        assert evaluator._tasks == ("bbox", "segm")
        assert evaluator._output_dir == out
        assert not evaluator._background_json  # no TEST.LVIS_EVAL node: the plain evaluator


def test_build_lvis_evaluator_reads_the_lvis_eval_keys(dataset):
    from disalign_det import add_disalign_config

    cfg = get_cfg()
    add_disalign_config(cfg)
    with tempfile.TemporaryDirectory() as out:
        evaluator = build_lvis_evaluator(cfg, dataset[0], out)
        assert evaluator._background_json and evaluator._backend.name == "lvis"  # the defaults
        cfg.TEST.LVIS_EVAL.BACKGROUND_RESULTS_JSON = False
        cfg.TEST.LVIS_EVAL.BACKEND = "fast"
        evaluator = build_lvis_evaluator(cfg, dataset[0], out)
        assert not evaluator._background_json and evaluator._backend.name == "fast"


def _coco_results(inputs_outputs):
    results = []
    for inp, out in inputs_outputs:
        for r in instances_to_coco_json(out["instances"], inp["image_id"]):
            r["category_id"] += 1
            results.append(r)
    return results


@pytest.mark.parametrize("max_dets", [300, 7, -1])
def test_fast_lvis_eval_is_bit_identical_to_lvis_eval(dataset, max_dets):
    from disalign_det.evaluation.fast_lvis_eval import FastLVISEval

    _, json_file, inputs_outputs = dataset
    results = _coco_results(inputs_outputs)
    for task in ("bbox", "segm"):
        task_results = copy.deepcopy(results)
        for r in task_results:
            r.pop("bbox" if task == "segm" else "segmentation")
        gt = LVIS(json_file)
        stock = LVISEval(gt, LVISResults(gt, copy.deepcopy(task_results), max_dets), task)
        stock.run()
        fast = FastLVISEval.from_results(gt, task_results, task, max_dets)
        fast.run()
        np.testing.assert_array_equal(stock.eval["precision"], fast.eval["precision"])
        np.testing.assert_array_equal(stock.eval["recall"], fast.eval["recall"])
        assert dict(stock.results) == dict(fast.results)
        assert stock.results["AP"] > 0.01  # not a degenerate comparison


@pytest.mark.slow  # the evaluator end to end with each backend, box and mask, Fixed AP: ~3 s
def test_fast_backend_equals_default_backend(dataset, tmp_path):
    name, _, inputs_outputs = dataset
    runs = {}
    for backend in ("lvis", "fast"):
        out = str(tmp_path / backend)
        ev = StreamingLVISEvaluator(
            name,
            distributed=False,
            output_dir=out,
            max_dets_per_image=9,
            fixed_ap_dets_per_class=40,
            backend=backend,
            per_class_dir=out,
        )
        runs[backend] = (
            _run(ev, inputs_outputs),
            json.loads(open(f"{out}/per_class_ap.json").read()),
        )
    assert set(runs["lvis"][0]) == {"bbox", "segm", "bbox_fixed", "segm_fixed"}
    _assert_same(runs["fast"][0], runs["lvis"][0])
    assert runs["fast"][1] == runs["lvis"][1]


@pytest.mark.slow  # a third-party C++ evaluator next to the LVIS API: ~1.5 s
def test_faster_coco_eval_backend_is_close_but_opt_in(dataset):
    pytest.importorskip("faster_coco_eval")
    name, _, inputs_outputs = dataset
    ours = _run(StreamingLVISEvaluator(name, distributed=False), inputs_outputs)
    faster = _run(
        StreamingLVISEvaluator(name, distributed=False, backend="faster_coco_eval"),
        inputs_outputs,
    )
    assert ours.keys() == faster.keys()
    for task in ours:
        for key in LVIS_METRICS:
            # Not guaranteed identical (docs/eval_backends.md): close, on this data.
            assert faster[task][key] == pytest.approx(ours[task][key], abs=0.05), (task, key)


def test_unknown_backend_names_the_key(dataset):
    with pytest.raises(ValueError, match="TEST.LVIS_EVAL.BACKEND"):
        StreamingLVISEvaluator(dataset[0], distributed=False, backend="pycocotools")
