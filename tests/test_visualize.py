"""tools/visualize.py on the tiny generated dataset with a randomly initialised model: output files
of the right size, ground truth beside the predictions, and the rare-class filter."""

import importlib.util
import json
import os

import pytest
import torch
from conftest import CONFIGS, REPO, TINY_CLASSES
from detectron2.structures import Instances
from PIL import Image

from disalign_det.data import get_class_frequency_buckets


@pytest.fixture(scope="module")
def vis():
    spec = importlib.util.spec_from_file_location(
        "visualize", os.path.join(REPO, "tools", "visualize.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _opts(paths):
    triples = (
        ("tiny_train", paths["train_json"], paths["image_root"]),
        ("tiny_val", paths["val_json"], paths["image_root"]),
    )
    return [
        "DATASETS.LVIS_FORMAT", repr(triples),
        "DATASETS.TRAIN", "('tiny_train',)",
        "DATASETS.TEST", "('tiny_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(TINY_CLASSES),
        "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "64",
        "TEST.DETECTIONS_PER_IMAGE", "30",
        "SEED", "0",
    ]  # fmt: skip


def _run(vis, tiny_dataset, out, *args):
    torch.manual_seed(0)  # the same random model in every call
    argv = ["--config-file", os.path.join(CONFIGS, "synthetic", "mask_rcnn_synth.yaml"),
            "--output", str(out), *args, *_opts(tiny_dataset)]  # fmt: skip
    assert vis.main(argv) == 0
    with open(os.path.join(out, "predictions.json")) as f:
        return json.load(f)["images"]


@pytest.mark.slow
def test_dataset_images_with_ground_truth(vis, tiny_dataset, tmp_path):
    # confidence 0: a random model's near-uniform scores are all drawn
    images = _run(vis, tiny_dataset, tmp_path, "--dataset", "tiny_val", "--num", "3",
                  "--confidence", "0", "--show-gt")  # fmt: skip
    assert len(images) == 3
    for entry in images:
        with Image.open(entry["image"]) as src, Image.open(entry["output"]) as out:
            w, h = src.size
            assert out.size == (2 * w, h)  # predictions | ground truth
        assert entry["num_shown"] == entry["num_predictions"] > 0
    assert {os.path.basename(e["output"]) for e in images} == set(os.listdir(tmp_path)) - {
        "predictions.json"
    }


@pytest.mark.slow
def test_input_folder_and_files(vis, tiny_dataset, tmp_path):
    folder = os.path.join(tiny_dataset["image_root"], "val2017")
    files = [os.path.join(folder, f) for f in sorted(os.listdir(folder))[:2]]
    images = _run(vis, tiny_dataset, tmp_path / "a", "--input", *files, "--confidence", "0.1",
                  "--scale", "2")  # fmt: skip
    assert len(images) == 2
    for entry in images:
        with Image.open(entry["image"]) as src, Image.open(entry["output"]) as out:
            assert out.size == (2 * src.size[0], 2 * src.size[1])
        assert all(s["score"] >= 0.1 for s in entry["shown"])
    whole = _run(vis, tiny_dataset, tmp_path / "b", "--input", folder, "--confidence", "0.5")
    assert len(whole) == len([f for f in os.listdir(folder) if f.endswith(".jpg")])


@pytest.mark.slow
def test_rare_class_filter(vis, tiny_dataset, tmp_path):
    buckets = get_class_frequency_buckets("tiny_train")
    rare = {k for k, b in enumerate(buckets) if b == "r"}
    assert rare and len(rare) < TINY_CLASSES, buckets  # the filter has something to remove

    args = ["--dataset", "tiny_val", "--num", "4", "--confidence", "0", "--show-gt"]
    everything = _run(vis, tiny_dataset, tmp_path / "all", *args)
    only_rare = _run(vis, tiny_dataset, tmp_path / "rare", *args, "--classes", "r")
    assert only_rare, "the tiny val set has images with rare ground truth"
    shown_all = [s for e in everything for s in e["shown"]]
    shown_rare = [s for e in only_rare for s in e["shown"]]
    assert any(s["bucket"] != "r" for s in shown_all)
    assert shown_rare and all(s["bucket"] == "r" and s["class"] in rare for s in shown_rare)
    # With the filter, the chosen images are those with rare ground truth, and what is drawn is a
    # subset of the same model's predictions on them.
    for e in only_rare:
        assert e["num_shown"] <= e["num_predictions"]
    with Image.open(only_rare[0]["output"]) as out, Image.open(only_rare[0]["image"]) as src:
        assert out.size == (2 * src.size[0], src.size[1])


def test_filter_instances_unit(vis):
    inst = Instances((10, 10))
    inst.scores = torch.tensor([0.9, 0.2, 0.5, 0.7])
    inst.pred_classes = torch.tensor([0, 1, 2, 5])
    assert vis.filter_instances(inst, 0.3, None).pred_classes.tolist() == [0, 2, 5]
    assert vis.filter_instances(inst, 0.3, {2, 5}).pred_classes.tolist() == [2, 5]
    assert vis.filter_instances(inst, 0.0, {1}).pred_classes.tolist() == [1]
    assert len(vis.filter_instances(inst, 0.0, set())) == 0
    assert vis.parse_classes("all") is None and vis.parse_classes("r, c") == {"r", "c"}
    with pytest.raises(ValueError):
        vis.parse_classes("rare")
