"""Export of the DisAlign model with detectron2's TracingAdapter + torch.jit.trace
(tools/export_model.py): the saved TorchScript model, loaded back, gives the eager model's
detections on images it was not traced on (boxes and scores within 1e-4, identical classes, mask
IoU > 0.99), for box and mask calibration with the softmax, the cosine and (detectron2 main) the
sigmoid classifier.

The calibration parameters are moved away from their identity start (beta = 1, gamma = 0), so a
trace that dropped or froze the calibration would give other scores and masks. detectron2 v0.6's
export package imports caffe2 and is skipped there (with the reason); current main runs it.
"""

import inspect
import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY_CLASSES, load_script, tiny_cfg


@pytest.fixture(scope="module")
def em():
    mod = load_script("tools/export_model.py")
    try:
        mod.export_api()
    except RuntimeError as e:
        pytest.skip(str(e))
    return mod


def _images(tiny_dataset, num):
    """``num`` BGR val images, and one wider (64 x 96) made of two: a size the trace never saw."""
    from detectron2.data.detection_utils import read_image

    root = os.path.join(tiny_dataset["image_root"], "val2017")
    files = sorted(os.listdir(root))[:num]
    imgs = [read_image(os.path.join(root, f), format="BGR") for f in files]
    wide = np.concatenate([imgs[-1], imgs[0][:, :32]], axis=1)
    return imgs + [wide]


def _model(cfg, em, seed=0):
    torch.manual_seed(seed)
    model = em.build_eager_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # beta, gamma and the confidence layer off their identity start.
            if "logit_scale" in name or "logit_bias" in name or "confidence_layer" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model


# config, a score threshold at which this random model keeps a different number of detections on
# each image (the cosine classifier's scale makes its scores peakier; sigmoid scores start near
# 0.5), and extra options.
CASES = {
    "softmax": ("synthetic/disalign_synth.yaml", "0.2", []),
    "cosine": ("synthetic/disalign_synth_cosine.yaml", "0.7", []),
    "sigmoid": (
        "synthetic/disalign_synth.yaml",
        "0.58",
        ["MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "True"],
    ),
}


def _has_sigmoid_classifier():
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

    return "use_sigmoid_ce" in inspect.signature(FastRCNNOutputLayers.__init__).parameters


@pytest.mark.parametrize(
    "case",
    [
        "softmax",
        pytest.param("cosine", marks=pytest.mark.slow),
        pytest.param("sigmoid", marks=pytest.mark.slow),
    ],
)
def test_exported_equals_eager(em, tiny_dataset, tmp_path, case):
    config, thresh, extra = CASES[case]
    if case == "sigmoid" and not _has_sigmoid_classifier():
        pytest.skip("this detectron2 (v0.6) has no sigmoid classifier (USE_SIGMOID_CE)")
    cfg = tiny_cfg(
        config,
        # The trace must not have fixed the count of detections of the image it was traced on.
        opts=["MODEL.ROI_HEADS.SCORE_THRESH_TEST", thresh, "TEST.DETECTIONS_PER_IMAGE", "20",
              "MODEL.DEVICE", "cpu", *extra],  # fmt: skip
    )
    assert cfg.MODEL.DISALIGN.BOX_CALIBRATION and cfg.MODEL.DISALIGN.MASK_CALIBRATION
    model = _model(cfg, em)
    imgs = _images(tiny_dataset, 3)  # three val images and a wider one
    inputs = [em.prepare_input(cfg, im) for im in imgs]
    path, _, _ = em.export(cfg, model, inputs[0], str(tmp_path))
    meta = json.load(open(os.path.join(tmp_path, "export.json")))
    assert meta["outputs"] == ["pred_boxes", "pred_classes", "pred_masks", "scores"]

    loaded = torch.jit.load(path)
    comparisons, counts = [], [len(em.run_eager(model, inputs[0]))]
    for inp in inputs[1:]:  # not the traced image; the last has another size
        eager = em.run_eager(model, inp)
        exported = em.run_exported(loaded, inp)
        assert eager.has("pred_masks")
        assert exported.image_size == eager.image_size == (inp["height"], inp["width"])
        comparisons.append(em.compare_instances(eager, exported))
        counts.append(len(eager))
    assert len(set(counts)) > 1 and min(counts[1:-1]) > 0, counts
    worst = em.summarize(comparisons)
    assert worst["ok"], worst
    assert worst["max_box_diff"] <= 1e-4 and worst["max_score_diff"] <= 1e-4
    assert worst["classes_equal"] and worst["min_mask_iou"] > 0.99

    # ExportedPredictor (BGR image in, original size out) == DefaultPredictor on the eager model.
    from detectron2.engine import DefaultPredictor

    predictor = DefaultPredictor(cfg)
    predictor.model = model
    ep = em.ExportedPredictor(str(tmp_path))
    c = em.compare_instances(predictor(imgs[-1])["instances"], ep(imgs[-1])["instances"])
    assert c["num"] > 0 and em.summarize([c])["ok"], c


@pytest.mark.slow
def test_the_check_detects_a_wrong_calibration(em, tiny_dataset, tmp_path):
    """The comparison is able to fail: an export of the model before its calibration moved is
    not equal to the calibrated model."""
    opts = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20"]
    cfg = tiny_cfg(CASES["softmax"][0], opts=opts)
    torch.manual_seed(0)
    identity = em.build_eager_model(cfg)
    calibrated = _model(cfg, em)
    inputs = [em.prepare_input(cfg, im) for im in _images(tiny_dataset, 1)]
    path, _, _ = em.export(cfg, identity, inputs[0], str(tmp_path))
    loaded = torch.jit.load(path)
    worst = em.summarize(
        [em.compare_instances(em.run_eager(calibrated, i), em.run_exported(loaded, i))
         for i in inputs[1:]]  # fmt: skip
    )
    assert not worst["ok"]


def test_compare_instances_maths():
    from detectron2.structures import Boxes, Instances

    def inst(boxes, scores, classes, masks):
        return Instances(
            (4, 4),
            pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
            scores=torch.tensor(scores),
            pred_classes=torch.tensor(classes),
            pred_masks=torch.tensor(masks, dtype=torch.bool),
        )

    m1 = np.zeros((2, 4, 4), bool)
    m1[0, :2, :2] = True  # 4 pixels
    m2 = m1.copy()
    m2[0, 2, 0] = True  # 5 pixels, 4 shared: IoU 0.8; second masks both empty: IoU 1
    a = inst([[0, 0, 1, 1], [1, 1, 2, 2]], [0.5, 0.25], [1, 2], m1)
    b = inst([[0, 0, 1, 1.5], [1, 1, 2, 2]], [0.5, 0.125], [1, 2], m2)
    c = load_script("tools/export_model.py").compare_instances(a, b)
    assert c["max_box_diff"] == pytest.approx(0.5)
    assert c["max_score_diff"] == pytest.approx(0.125)
    assert c["min_mask_iou"] == pytest.approx(0.8)
    assert c["classes_equal"]


@pytest.mark.slow
def test_export_tool_end_to_end(em, tiny_dataset, tmp_path):
    """tools/export_model.py writes the model and its report; the check passes; the benchmark
    times both models in the same run."""
    triples = (("tiny_train", tiny_dataset["train_json"], tiny_dataset["image_root"]),
               ("tiny_val", tiny_dataset["val_json"], tiny_dataset["image_root"]))  # fmt: skip
    out = tmp_path / "export"
    argv = [
        "--config-file", os.path.join(os.path.dirname(__file__), "..", "configs", "LVIS",
                                      "synthetic", "disalign_synth.yaml"),
        "--output", str(out), "--check", "3", "--benchmark", "2",
        "DATASETS.LVIS_FORMAT", repr(triples), "DATASETS.TRAIN", "('tiny_train',)",
        "DATASETS.TEST", "('tiny_val',)", "MODEL.ROI_HEADS.NUM_CLASSES", str(TINY_CLASSES),
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "10",
    ]  # fmt: skip
    assert em.main(argv) == 0
    report = json.load(open(out / "export_report.json"))
    assert report["check"]["ok"] and report["check"]["images"] == 3
    b = report["benchmark"]
    assert b["images"] == 2 and b["eager_s_per_image"] > 0 and b["exported_s_per_image"] > 0
    assert os.path.isfile(out / "model.ts")
