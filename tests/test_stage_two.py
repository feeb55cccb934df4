"""DisAlign stage two end to end on a tiny generated dataset: a stage-two model built from a
stage-one checkpoint predicts exactly what stage one predicts; after freezing only the calibration
trains and every other tensor stays bit-identical; cascade heads; clear errors."""

import os

import pytest
import torch
from conftest import tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from disalign_det.engine import DisAlignCheckpointer, Trainer
from disalign_det.modeling import is_calibration_parameter


@pytest.fixture(scope="module")
def stage_one(tiny_dataset, tmp_path_factory):
    """A stage-one checkpoint whose predictions are diverse (random but not near-uniform)."""
    out = str(tmp_path_factory.mktemp("stage1"))
    cfg = tiny_cfg(output_dir=out)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        head = model.roi_heads
        head.box_predictor.cls_score.weight.normal_(std=0.05)
        head.box_predictor.cls_score.bias[-1] = -2.0  # fewer background wins: more detections
        head.mask_head.predictor.weight.normal_(std=0.1)
    path = os.path.join(out, "stage1.pth")
    DetectionCheckpointer(model, out).save("stage1")
    return path, cfg


def _val_batch(cfg, n=3):
    mapper = DatasetMapper(cfg, is_train=False)
    return [mapper(d) for d in DatasetCatalog.get("tiny_val")[:n]]


def _stage_two_cfg(output_dir, weights, config="synthetic/disalign_synth.yaml", opts=()):
    return tiny_cfg(config, output_dir, ["MODEL.WEIGHTS", weights, *opts])


@pytest.mark.parametrize(
    "config", ["synthetic/disalign_synth.yaml", "synthetic/disalign_box_only_synth.yaml"]
)
@pytest.mark.slow
def test_stage_two_starts_from_stage_one_predictions(stage_one, tmp_path, config):
    path, cfg1 = stage_one
    cfg2 = _stage_two_cfg(str(tmp_path), path, config)
    cfg1 = cfg1.clone()
    for cfg in (cfg1, cfg2):
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    m1 = build_model(cfg1)
    DetectionCheckpointer(m1).load(path)
    m2 = Trainer.build_model(cfg2)
    DisAlignCheckpointer(m2, strict_stage_one=True).load(path)
    m1.eval(), m2.eval()
    batch = _val_batch(cfg1)
    with torch.no_grad():
        out1, out2 = m1(batch), m2(batch)
    total = 0
    for a, b in zip(out1, out2):
        a, b = a["instances"], b["instances"]
        total += len(a)
        assert len(a) == len(b)
        assert torch.equal(a.pred_classes, b.pred_classes)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=0, atol=1e-5)
        assert torch.equal(a.pred_masks, b.pred_masks)  # binary masks after pasting
    assert total > 10, "the stage-one model must predict something for this test to mean anything"


@pytest.mark.slow
def test_stage_two_trains_only_calibration(stage_one, tmp_path):
    path, _ = stage_one
    cfg = _stage_two_cfg(
        str(tmp_path), path, opts=["SOLVER.MAX_ITER", "4", "SOLVER.BASE_LR", "0.5"]
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        [
            "roi_heads.box_predictor.logit_scale",
            "roi_heads.box_predictor.logit_bias",
            "roi_heads.box_predictor.confidence_layer.weight",
            "roi_heads.box_predictor.confidence_layer.bias",
            "roi_heads.mask_head.logit_scale",
            "roi_heads.mask_head.logit_bias",
            "roi_heads.mask_head.confidence_layer.weight",
            "roi_heads.mask_head.confidence_layer.bias",
        ]
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    after = model.state_dict()
    reference = torch.load(path, map_location="cpu", weights_only=True)["model"]
    changed = []
    for k, v in after.items():
        if is_calibration_parameter(k):
            if not torch.equal(v, before[k]):
                changed.append(k)
            continue
        # Every stage-one tensor, BatchNorm statistics included, is bit-identical.
        assert torch.equal(v, reference[k]), k
    assert {"roi_heads.box_predictor.logit_scale", "roi_heads.mask_head.logit_scale"} <= set(
        changed
    )
    # Only the calibration losses were computed: no RPN or box-regression loss.
    losses = trainer.storage.latest()
    assert "loss_cls" in losses and "loss_mask" in losses
    assert not any(k.startswith(("loss_rpn", "loss_box_reg")) for k in losses)


@pytest.mark.slow
def test_stage_two_losses_finite_without_foreground(stage_one, tmp_path):
    path, _ = stage_one
    cfg = _stage_two_cfg(str(tmp_path), path)
    model = Trainer.build_model(cfg)
    DisAlignCheckpointer(model, strict_stage_one=True).load(path)
    model.train()
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.zeros(0, 4))
    inst.gt_classes = torch.zeros(0, dtype=torch.long)
    from detectron2.structures import BitMasks

    inst.gt_masks = BitMasks(torch.zeros(0, 64, 64, dtype=torch.bool))
    batch = [{"image": torch.zeros(3, 64, 64), "instances": inst, "height": 64, "width": 64}] * 2
    with EventStorage():
        losses = model(batch)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


@pytest.mark.slow
def test_cascade_heads_build_and_train(tiny_dataset, tmp_path):
    opts = [
        "MODEL.ROI_HEADS.NAME",
        "DisAlignCascadeROIHeads",
        "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG",
        "True",
        "MODEL.DISALIGN.CLS_LOSS",
        "ce",
    ]
    cfg1 = tiny_cfg(
        output_dir=str(tmp_path / "s1"), opts=opts + ["MODEL.DISALIGN.BOX_CALIBRATION", "False"]
    )
    trainer = Trainer(cfg1)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert len(trainer.model.roi_heads.box_predictor) == 3
    DetectionCheckpointer(trainer.model, str(tmp_path)).save("cascade1")
    cfg2 = _stage_two_cfg(
        str(tmp_path / "s2"),
        str(tmp_path / "cascade1.pth"),
        opts=opts + ["MODEL.DISALIGN.CLS_LOSS", "grw", "SOLVER.BASE_LR", "0.5"],
    )
    trainer2 = Trainer(cfg2)
    trainer2.resume_or_load(resume=False)
    trainer2.train()
    preds = trainer2.model.roi_heads.box_predictor
    for stage in preds:
        assert stage.calibrate and stage.logit_scale.requires_grad
        assert not torch.equal(stage.logit_scale.detach(), torch.ones_like(stage.logit_scale))
    assert torch.isfinite(torch.tensor(trainer2.storage.latest()["total_loss"][0]))


def test_freezing_everything_fails_clearly(tiny_dataset):
    cfg = tiny_cfg(opts=["MODEL.DISALIGN.FREEZE", "all_but_calibration"])
    with pytest.raises(ValueError, match="leaves nothing to train"):
        Trainer.build_model(cfg)


@pytest.mark.slow
def test_checkpoint_with_other_class_count_fails_clearly(stage_one, tmp_path):
    path, _ = stage_one
    cfg = _stage_two_cfg(str(tmp_path), path, opts=["MODEL.ROI_HEADS.NUM_CLASSES", "7"])
    cfg.DATASETS.TRAIN = ()
    cfg.MODEL.DISALIGN.CLS_LOSS = "ce"
    cfg.MODEL.DISALIGN.MASK_LOSS = "bce"
    model = Trainer.build_model(cfg)
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        DisAlignCheckpointer(model, strict_stage_one=True).load(path)
