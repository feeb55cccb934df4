"""tools/train_net.py end to end on the tiny generated dataset: a few training iterations with
finite losses, LVIS evaluation with every metric, eval-only, and the JSON written to OUTPUT_DIR."""

import json
import math
import os

import pytest
from common import CONFIGS, tiny_opts

from tools import train_net as tn

METRICS = {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"}


def _opts(out, iters=2):
    return tiny_opts(
        ("tiny_val",), output_dir=out, max_iter=iters, dets_per_image=20, post_nms_topk_test=32
    )


def _check_metrics(results):
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert METRICS <= set(results[task]), task
        for k, v in results[task].items():
            # A NaN (or inf) metric is a broken evaluation, not a low score.
            assert isinstance(v, float) and math.isfinite(v), (task, k, v)


@pytest.mark.slow
def test_train_then_evaluate(tiny_dataset, tmp_path):
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
    config = os.path.join(CONFIGS, "synthetic", "disalign_synth.yaml")
    args = tn.default_argument_parser().parse_args(["--config-file", config, *_opts(str(tmp_path))])
    with pytest.raises(ValueError, match="MODEL.WEIGHTS"):
        tn.setup(args)
