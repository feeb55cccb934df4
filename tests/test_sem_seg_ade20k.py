"""The ADE20K configs: they load and build; stage one and DisAlign stage two run one CPU iteration
each through the project's Trainer on a tiny ADE-shaped fixture (ADEChallengeData2016 layout with a
few tiny PNGs), and evaluate with the long-tail evaluator."""

import glob
import json
import os

import numpy as np
import pytest
import torch
from common import REPO
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from PIL import Image

from disalign_det import add_disalign_config
from disalign_det.engine import Trainer

ADE_CONFIGS = os.path.join(REPO, "configs", "ADE20K")
ADE_NAMES = ("ade20k_sem_seg_train", "ade20k_sem_seg_val")
# Small enough for a CPU: the ASPP's pooling kernel follows the crop (64 / 8).
TINY = [
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "1",
    "SOLVER.CHECKPOINT_PERIOD", "1",
    "INPUT.CROP.SIZE", "(64, 64)",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "128",
    "DATALOADER.NUM_WORKERS", "0",
    "TEST.EVAL_PERIOD", "0",
    "MODEL.DEVICE", "cpu",
]  # fmt: skip


def _reregister(root):
    from detectron2.data.datasets.builtin import register_all_ade20k

    for name in ADE_NAMES:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_all_ade20k(root)


@pytest.fixture(scope="module")
def ade_fixture(tmp_path_factory):
    """$ROOT/ADEChallengeData2016/{images,annotations_detectron2}/{training,validation} with three
    tiny images per split (labels 0-149 and 255, as detectron2's prepare_ade20k_sem_seg.py writes
    them) and objectInfo150.txt; detectron2's built-in ADE20K names point at it for the module."""
    root = str(tmp_path_factory.mktemp("ade"))
    ade = os.path.join(root, "ADEChallengeData2016")
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        os.makedirs(os.path.join(ade, "images", split))
        os.makedirs(os.path.join(ade, "annotations_detectron2", split))
        for i in range(3):
            stem = f"ADE_{split[:5]}_{i:08d}"
            img = rng.integers(0, 255, size=(72, 88, 3), dtype=np.uint8)
            label = rng.integers(0, 150, size=(72, 88)).astype(np.uint8)
            label[:4] = 255
            Image.fromarray(img).save(os.path.join(ade, "images", split, stem + ".jpg"))
            Image.fromarray(label).save(
                os.path.join(ade, "annotations_detectron2", split, stem + ".png")
            )
    lines = ["Idx\tRatio\tTrain\tVal\tName"]
    lines += [f"{i}\t{0.2 / i:.6f}\t{1000 // i}\t{100 // i}\tclass{i}" for i in range(1, 151)]
    with open(os.path.join(ade, "objectInfo150.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    old_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    _reregister(root)
    yield ade
    _reregister(old_root)


def _cfg(name, opts=()):
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.merge_from_file(os.path.join(ADE_CONFIGS, name))
    cfg.merge_from_list(list(opts))
    if opts:  # SyncBN needs a process group: plain BN for the CPU runs
        for node in (cfg.MODEL.RESNETS, cfg.MODEL.SEM_SEG_HEAD):
            node.NORM = "BN" if node.NORM == "SyncBN" else node.NORM
    return cfg


CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ADE_CONFIGS, "*_160k.yaml")))
STAGE_TWOS = sorted(
    os.path.basename(p) for p in glob.glob(os.path.join(ADE_CONFIGS, "disalign_*_4k.yaml"))
)


def test_ade20k_configs_load_and_build():
    assert len(CONFIGS) == 3 and len(STAGE_TWOS) == 3
    for name in CONFIGS + STAGE_TWOS:
        cfg = _cfg(name, TINY + ["MODEL.WEIGHTS", ""])
        # The official recipe: 512x512 crops, batch 16, 160k (stage one) / 4k (DisAlign) iterations.
        assert tuple(cfg.INPUT.CROP.SIZE) == (64, 64) and cfg.SOLVER.BASE_LR == 0.01
        assert _cfg(name).SOLVER.IMS_PER_BATCH == 16
        assert tuple(_cfg(name).INPUT.CROP.SIZE) == (512, 512)
        assert _cfg(name).SOLVER.MAX_ITER == (4000 if name.startswith("disalign") else 160000)
        model = build_model(cfg)
        assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 150
        calibration = [n for n, _ in model.named_parameters() if "logit_scale" in n]
        assert calibration == (
            ["sem_seg_head.predictor.logit_scale"] if name.startswith("disalign") else []
        )
        if name.startswith("disalign"):
            assert cfg.MODEL.DISALIGN.FREEZE == "all_but_calibration"
            assert cfg.MODEL.DISALIGN.RHO == 0.2
            stage_one = _cfg(name.replace("disalign_", "").replace("_4k", "_160k"))
            assert cfg.MODEL.WEIGHTS == "" and stage_one.OUTPUT_DIR in _cfg(name).MODEL.WEIGHTS


def _run(cfg):
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    with open(os.path.join(cfg.OUTPUT_DIR, "metrics_final.json")) as f:
        return trainer, json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage_one,stage_two",
    [
        ("semantic_fpn_R_50_512x512_160k.yaml", "disalign_semantic_fpn_R_50_512x512_4k.yaml"),
        (
            "deeplab_v3_plus_R_50_D8_512x512_160k.yaml",
            "disalign_deeplab_v3_plus_R_50_D8_512x512_4k.yaml",
        ),
    ],
)
def test_ade20k_one_iteration_each_stage(ade_fixture, tmp_path, stage_one, stage_two):
    torch.manual_seed(0)
    out1 = str(tmp_path / "stage_one")
    cfg1 = _cfg(stage_one, TINY + ["MODEL.WEIGHTS", "", "OUTPUT_DIR", out1])
    _, metrics1 = _run(cfg1)
    ratios = os.path.join(ade_fixture, "objectInfo150.txt")
    out2 = str(tmp_path / "stage_two")
    cfg2 = _cfg(
        stage_two,
        TINY
        + ["MODEL.WEIGHTS", os.path.join(out1, "model_final.pth"), "OUTPUT_DIR", out2]
        + ["MODEL.DISALIGN.PIXEL_RATIOS_FILE", ratios],
    )
    trainer, metrics2 = _run(cfg2)
    for m in (metrics1, metrics2):
        res = m["sem_seg"]
        assert {"mIoU", "mIoU-head", "mIoU-body", "mIoU-tail", "mACC-tail"} <= set(res)
    # GRW weights from objectInfo150's ratios: (1 / r_c) ** 0.2 scaled to mean 1.
    r = np.array([float(f"{0.2 / i:.6f}") for i in range(1, 151)])  # as written in the file
    w = (1 / r) ** 0.2
    head = trainer.model.sem_seg_head
    np.testing.assert_allclose(head.pixel_class_weights().numpy(), w / w.mean(), rtol=1e-5)
    # Stage two changed only the calibration of the stage-one model.
    one = torch.load(os.path.join(out1, "model_final.pth"), weights_only=False)["model"]
    two = torch.load(os.path.join(out2, "model_final.pth"), weights_only=False)["model"]
    assert all(torch.equal(v, two[k]) for k, v in one.items())
    assert sorted(set(two) - set(one)) == [
        "sem_seg_head.predictor.confidence_layer.bias",
        "sem_seg_head.predictor.confidence_layer.weight",
        "sem_seg_head.predictor.logit_bias",
        "sem_seg_head.predictor.logit_scale",
    ]
    assert os.path.isfile(
        os.path.join(out2, "inference", "ade20k_sem_seg_val", "per_class_iou.csv")
    )


def test_stage_two_refuses_a_checkpoint_of_another_architecture(tmp_path):
    """Loading fails on anything but missing calibration keys (the LVIS checkpointer's rule)."""
    from disalign_det.engine.checkpoint import DisAlignCheckpointer
    from disalign_det.modeling import is_calibration_parameter

    cfg = _cfg("disalign_semantic_fpn_R_50_512x512_4k.yaml", TINY + ["MODEL.WEIGHTS", ""])
    model = build_model(cfg)
    state = {k: v for k, v in model.state_dict().items() if not is_calibration_parameter(k)}
    # A checkpoint with another class count: the predictor's shapes differ.
    state["sem_seg_head.predictor.weight"] = torch.zeros(10, 128, 1, 1)
    path = str(tmp_path / "other.pth")
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="shape mismatch"):
        DisAlignCheckpointer(model, strict_stage_one=True).load(path)
    # One missing frozen tensor (not calibration): refused too.
    state = {k: v for k, v in model.state_dict().items() if not is_calibration_parameter(k)}
    state.pop("sem_seg_head.p2.0.weight")
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="lacks 1 parameter"):
        DisAlignCheckpointer(model, strict_stage_one=True).load(path)
