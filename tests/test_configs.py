"""Every shipped config loads and builds a model on CPU (LVIS configs with all 1203 classes)."""

import glob
import json
import os
import re

import pytest
import torch
from common import CONFIGS, REPO, TINY_CLASSES
from detectron2.config import get_cfg

from disalign_det import add_disalign_config
from disalign_det.compat.features import has_federated_loss
from disalign_det.data import register_lvis_format
from disalign_det.engine import Trainer

ALL = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))
LVIS_CLASSES = 1203


@pytest.fixture(scope="module")
def lvis_like_train(tmp_path_factory):
    """A json with LVIS v1's class count and frequency fields (no images: only counts are read)."""
    folder = tmp_path_factory.mktemp("lvis_like")
    cats = [
        {
            "id": i + 1,
            "name": f"class_{i + 1}",
            "synset": f"class_{i + 1}.n.01",
            "synonyms": [f"class_{i + 1}"],
            "def": "",
            "frequency": "rcf"[i % 3],
            "image_count": 5 + i,
            "instance_count": 7 + 2 * i,
        }
        for i in range(LVIS_CLASSES)
    ]
    data = {"info": {}, "licenses": [], "images": [], "annotations": [], "categories": cats}
    path = folder / "lvis_like_train.json"
    path.write_text(json.dumps(data))
    register_lvis_format("lvis_like_train", str(path), str(folder) + "/")
    return "lvis_like_train"


def _docs_config_table():
    """Config names (relative to configs/LVIS/) in the table headed ``| config | what |`` of
    docs/configuration.md (the README links it)."""
    with open(os.path.join(REPO, "docs", "configuration.md")) as f:
        lines = f.read().split("\n| config | what |\n", 1)[1].splitlines()
    listed = []
    for line in lines[1:]:  # lines[0] is the |---|---| separator
        if not line.startswith("|"):
            break
        first_cell = line.split("|")[1]
        listed += re.findall(r"`([^`]+)`", first_cell)
    return listed


def test_every_config_is_listed():
    files = {
        os.path.relpath(p, CONFIGS)
        for p in glob.glob(os.path.join(CONFIGS, "**", "*"), recursive=True)
        if p.endswith((".yaml", ".py"))
    }
    names = {os.path.relpath(p, CONFIGS) for p in ALL}
    assert "disalign_mask_rcnn.yaml" in names and "synthetic/disalign_synth.yaml" in names
    assert len(names) >= 17
    listed = _docs_config_table()
    assert len(listed) == len(set(listed)), "a config is listed twice in the docs table"
    assert set(listed) - files == set(), "docs/configuration.md lists configs that do not exist"
    assert files - set(listed) == set(), "configs missing from docs/configuration.md's table"


@pytest.mark.parametrize("path", ALL, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_config_builds_on_cpu(path, lvis_like_train, tiny_dataset):
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES == LVIS_CLASSES:
        assert cfg.DATASETS.TRAIN == ("lvis_v1_train",)
        assert cfg.TEST.DETECTIONS_PER_IMAGE == 300
        cfg.DATASETS.TRAIN = (lvis_like_train,)
    else:
        assert cfg.DATASETS.TRAIN in (("lvis_synth_train",), ("lvis_synth_lt_train",))
        cfg.DATASETS.TRAIN = ("tiny_train",)
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = TINY_CLASSES
    stage_two = cfg.MODEL.DISALIGN.FREEZE != "none"
    if stage_two:
        assert cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
        assert cfg.MODEL.WEIGHTS == ""  # must be given explicitly: the stage-one checkpoint
    torch.manual_seed(0)
    if cfg.MODEL.ROI_BOX_HEAD.STAGE_ONE_LOSS in ("eqlv2", "ecm") and not has_federated_loss():
        # detectron2 v0.6 has no sigmoid classifier: a clear error naming the key.
        with pytest.raises(ValueError, match=r"MODEL\.ROI_BOX_HEAD\.STAGE_ONE_LOSS"):
            Trainer.build_model(cfg)
        return
    model = Trainer.build_model(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if stage_two:
        assert trainable and all(
            any(k in n for k in ("logit_scale", "logit_bias", "confidence_layer"))
            for n in trainable
        )
    else:
        # Stage one: the whole detector trains (the FREEZE_AT stem/res2 of R50 aside).
        assert any(n.startswith("backbone.") for n in trainable)
        assert any("cls_score" in n for n in trainable) and any("predictor" in n for n in trainable)


def test_official_stage_two_recipe():
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, "disalign_box_only.yaml"))
    assert cfg.SOLVER.MAX_ITER == 9000 and cfg.SOLVER.STEPS == (8000,)
    assert cfg.SOLVER.BASE_LR == 0.02 and cfg.SOLVER.IMS_PER_BATCH == 16
    assert cfg.MODEL.DISALIGN.RHO == 0.8 and cfg.MODEL.DISALIGN.CLS_LOSS == "grw"
    assert cfg.MODEL.DISALIGN.BOX_CALIBRATION and not cfg.MODEL.DISALIGN.MASK_CALIBRATION
    assert cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
    stage_one = get_cfg()
    add_disalign_config(stage_one)
    stage_one.merge_from_file(os.path.join(CONFIGS, "mask_rcnn_R_50_FPN_2x.yaml"))
    assert stage_one.SOLVER.MAX_ITER == 180000 and stage_one.SOLVER.STEPS == (120000, 160000)
    assert stage_one.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.0001
    assert stage_one.INPUT.MIN_SIZE_TRAIN == (640, 672, 704, 736, 768, 800)


def test_inference_cfg_falls_back_to_cpu_and_names_a_missing_file(tmp_path):
    from disalign_det.config import get_inference_cfg

    config = os.path.join(CONFIGS, "disalign_mask_rcnn.yaml")
    cfg = get_inference_cfg(config, ["MODEL.DEVICE", "cuda", "TEST.DETECTIONS_PER_IMAGE", "7"])
    assert cfg.MODEL.DEVICE == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 7 and cfg.MODEL.DISALIGN.BOX_CALIBRATION
    assert not cfg.is_frozen()  # the tools still change it
    with pytest.raises(FileNotFoundError, match="--config-file .*nope.yaml"):
        get_inference_cfg(str(tmp_path / "nope.yaml"))
