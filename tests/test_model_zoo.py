"""DisAlign stage two on detectron2's published LVIS v0.5 checkpoints, without Python: the YAML
deltas of configs/LVISv0.5/ on top of the installed model-zoo configs (``_BASE_: model_zoo:...``).

Needs the model-zoo YAMLs, which detectron2 built from source ships and the PyPI v0.6 does not.
"""

import os
import pickle

import pytest
import torch
from conftest import REPO
from detectron2.config import get_cfg

from disalign_det import add_disalign_config
from disalign_det.model_zoo import merge_config_file, model_zoo_config_file

V05 = os.path.join(REPO, "configs", "LVISv0.5")
ZOO = "LVISv0.5-InstanceSegmentation/mask_rcnn_{}_FPN_1x.yaml"
BACKBONES = ["R_50", "R_101", "X_101_32x8d"]


def _has_model_zoo():
    try:
        model_zoo_config_file(ZOO.format("R_50"))
        return True
    except FileNotFoundError:
        return False


needs_zoo = pytest.mark.skipif(
    not _has_model_zoo(),
    reason="the installed detectron2 ships no model-zoo configs (PyPI v0.6); detectron2 built "
    "from source does",
)

SMALL = [
    "INPUT.MIN_SIZE_TEST",
    "96",
    "INPUT.MAX_SIZE_TEST",
    "128",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "50",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "200",
    "TEST.DETECTIONS_PER_IMAGE",
    "40",
    "MODEL.DEVICE",
    "cpu",
]


def _cfg(path, opts=()):
    cfg = get_cfg()
    add_disalign_config(cfg)
    merge_config_file(cfg, path)
    cfg.merge_from_list(list(opts))
    return cfg


@needs_zoo
@pytest.mark.parametrize("backbone", BACKBONES)
def test_delta_is_the_model_zoo_config_plus_the_v05_recipe(backbone):
    from detectron2 import model_zoo

    zoo = _cfg(model_zoo_config_file(ZOO.format(backbone)))
    cfg = _cfg(os.path.join(V05, f"disalign_mask_rcnn_{backbone}_FPN_1x.yaml"))
    # The published checkpoint of that very config.
    url = model_zoo.get_checkpoint_url(ZOO.format(backbone))
    assert (
        cfg.MODEL.WEIGHTS.replace("detectron2://", "https://dl.fbaipublicfiles.com/detectron2/")
        == url
    )
    # The stage-one architecture is the model zoo's.
    for key in ("RESNETS", "FPN", "BACKBONE", "ANCHOR_GENERATOR", "ROI_BOX_HEAD", "RPN"):
        assert cfg.MODEL[key] == zoo.MODEL[key], key
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1230 and cfg.DATASETS.TRAIN == ("lvis_v0.5_train",)
    assert (cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD) == (
        zoo.MODEL.PIXEL_MEAN,
        zoo.MODEL.PIXEL_STD,
    )
    # The official v0.5 stage two.
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.BASE_LR) == (4500, (4000,), 0.02)
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.MODEL.DISALIGN.RHO == 0.8
    assert cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
    assert cfg.MODEL.DISALIGN.FREEZE == "all_but_calibration"


@needs_zoo
def test_box_only_delta_is_the_r50_delta_without_mask_calibration():
    full = _cfg(os.path.join(V05, "disalign_mask_rcnn_R_50_FPN_1x.yaml"))
    box = _cfg(os.path.join(V05, "disalign_box_only_R_50_FPN_1x.yaml"))
    assert box.MODEL.ROI_MASK_HEAD.NAME == "MaskRCNNConvUpsampleHead"
    assert not box.MODEL.DISALIGN.MASK_CALIBRATION and box.MODEL.DISALIGN.BOX_CALIBRATION
    box.MODEL.ROI_MASK_HEAD.NAME = full.MODEL.ROI_MASK_HEAD.NAME
    box.MODEL.DISALIGN.MASK_CALIBRATION = True
    box.OUTPUT_DIR = full.OUTPUT_DIR
    assert box == full


def test_missing_model_zoo_config_is_a_clear_error(tmp_path):
    path = tmp_path / "delta.yaml"
    path.write_text('_BASE_: "model_zoo:NoSuch/config.yaml"\nSOLVER:\n  MAX_ITER: 3\n')
    with pytest.raises(FileNotFoundError, match=r"model_zoo:NoSuch/config.yaml .*delta.yaml"):
        _cfg(str(path))


def test_plain_bases_are_merged_by_detectron2(tmp_path):
    """Without a model-zoo base anywhere, merge_config_file is cfg.merge_from_file."""
    path = os.path.join(REPO, "configs", "LVIS", "disalign_box_only.yaml")
    a = _cfg(path)
    b = get_cfg()
    add_disalign_config(b)
    b.merge_from_file(path)
    assert a == b


@needs_zoo
@pytest.mark.slow
def test_published_checkpoint_format_loads_with_only_calibration_missing(tmp_path):
    """A checkpoint in the model-zoo format ({"model": numpy arrays, "__author__": ...}) of the
    model-zoo R50 config loads into the stage-two delta with only the calibration missing, and the
    stage-two model predicts what the stage one predicts (scores within 1e-6, identical masks)."""
    from detectron2.modeling import build_model

    from disalign_det.engine import DisAlignCheckpointer, Trainer
    from disalign_det.modeling import is_calibration_parameter

    torch.manual_seed(0)
    stage_one = build_model(_cfg(model_zoo_config_file(ZOO.format("R_50")), SMALL)).eval()
    with torch.no_grad():
        for name, p in stage_one.named_parameters():
            if "cls_score" in name:
                p.normal_(0.0, 0.5)
    state = {k: v.numpy() for k, v in stage_one.state_dict().items()}
    pkl = tmp_path / "model_final_zoo.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)

    cfg = _cfg(
        os.path.join(V05, "disalign_mask_rcnn_R_50_FPN_1x.yaml"),
        SMALL + ["MODEL.WEIGHTS", str(pkl), "OUTPUT_DIR", str(tmp_path / "out")],
    )
    model = Trainer.build_model(cfg)
    missing = set(model.state_dict()) - set(state)
    assert missing and all(is_calibration_parameter(k) for k in missing), missing
    assert not set(state) - set(model.state_dict())
    DisAlignCheckpointer(model, strict_stage_one=True).resume_or_load(cfg.MODEL.WEIGHTS)
    model.eval()
    g = torch.Generator().manual_seed(1)
    batch = [
        {
            "image": torch.randint(0, 256, (3, 96, 128), generator=g).float(),
            "height": 96,
            "width": 128,
        }
        for _ in range(2)
    ]
    with torch.no_grad():
        ref, out = stage_one(batch), model(batch)
    for r, o in zip(ref, out):
        r, o = r["instances"], o["instances"]
        assert len(r) == len(o) > 0
        assert torch.equal(r.pred_classes, o.pred_classes)
        assert torch.allclose(r.scores, o.scores, atol=1e-6, rtol=0)
        assert torch.allclose(r.pred_boxes.tensor, o.pred_boxes.tensor, atol=1e-4, rtol=0)
        assert torch.equal(r.pred_masks, o.pred_masks)
    # A model-zoo checkpoint that lacks a frozen parameter is refused.
    bad = dict(state)
    bad.pop("backbone.bottom_up.res2.0.conv1.weight")
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump({"model": bad, "__author__": "Detectron2 Model Zoo"}, f)
    with pytest.raises(ValueError, match="lacks"):
        DisAlignCheckpointer(Trainer.build_model(cfg), strict_stage_one=True).load(
            str(tmp_path / "bad.pkl")
        )
