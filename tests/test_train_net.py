"""tools/train_net.py end to end on the tiny generated dataset: a few training iterations with
finite losses, LVIS evaluation with every metric, eval-only, and the JSON written to OUTPUT_DIR."""

import json
import math
import os

import pytest
from conftest import CONFIGS, TINY_CLASSES, load_script

METRICS = {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"}


def _opts(out, iters=2):
    return [
        "DATASETS.TRAIN", "('tiny_train',)",
        "DATASETS.TEST", "('tiny_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(TINY_CLASSES),
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "TEST.DETECTIONS_PER_IMAGE", "20",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(iters), "SOLVER.WARMUP_ITERS", "0",
        "OUTPUT_DIR", out,
    ]  # fmt: skip


def _check_metrics(results):
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert METRICS <= set(results[task]), task
        for v in results[task].values():
            assert isinstance(v, float)


def test_train_then_evaluate(tiny_dataset, tmp_path):
    tn = load_script("tools/train_net.py")
    config = os.path.join(CONFIGS, "synthetic", "mask_rcnn_synth.yaml")
    out = str(tmp_path / "s1")
    args = tn.default_argument_parser().parse_args(["--config-file", config, *_opts(out)])
    results = tn.main(args)
    _check_metrics(results)
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(math.isfinite(v) for v in losses)
    with open(os.path.join(out, "metrics_final.json")) as f:
        _check_metrics(json.load(f))
    assert os.path.isfile(os.path.join(out, "model_final.pth"))

    # eval-only from the checkpoint, and DisAlign stage two from it.
    args = tn.default_argument_parser().parse_args(
        ["--config-file", config, "--eval-only", *_opts(str(tmp_path / "ev")),
         "MODEL.WEIGHTS", os.path.join(out, "model_final.pth")]
    )  # fmt: skip
    _check_metrics(tn.main(args))
    stage_two = os.path.join(CONFIGS, "synthetic", "disalign_synth.yaml")
    args = tn.default_argument_parser().parse_args(
        ["--config-file", stage_two, *_opts(str(tmp_path / "s2")),
         "MODEL.WEIGHTS", os.path.join(out, "model_final.pth")]
    )  # fmt: skip
    _check_metrics(tn.main(args))


def test_stage_two_without_weights_names_the_key(tiny_dataset, tmp_path):
    tn = load_script("tools/train_net.py")
    config = os.path.join(CONFIGS, "synthetic", "disalign_synth.yaml")
    args = tn.default_argument_parser().parse_args(["--config-file", config, *_opts(str(tmp_path))])
    with pytest.raises(ValueError, match="MODEL.WEIGHTS"):
        tn.setup(args)
