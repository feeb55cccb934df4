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
from disalign_det.modeling import install_class_weights, is_calibration_parameter


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
    install_class_weights(model, cfg)
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


# --------------------------------------------------------------------------------------------------
# Deployable: building reads no training json; what inference needs travels with the checkpoint
# --------------------------------------------------------------------------------------------------

NORCAL = ["MODEL.DISALIGN.POSTHOC", "norcal", "MODEL.DISALIGN.POSTHOC_POWER", "0.7"]
ABSENT_TRAIN = ["DATASETS.TRAIN", "('lvis_v1_train',)"]  # its json is not on this machine


def _tiny_counts(name, source="instance_count"):
    from disalign_det.data import get_class_counts

    return torch.as_tensor(get_class_counts(name, source), dtype=torch.float32)


def test_building_reads_no_training_json_and_grw_losses_refuse_without_weights(stage_one, tmp_path):
    path, _ = stage_one
    cfg = _stage_two_cfg(str(tmp_path), path, opts=ABSENT_TRAIN + NORCAL)
    assert not os.path.exists("datasets/lvis/lvis_v1_train.json")
    model = Trainer.build_model(cfg)  # GRW box and mask losses, NorCal: no json read
    DisAlignCheckpointer(model, strict_stage_one=True).load(path)
    model.train()
    with EventStorage(), pytest.raises(RuntimeError, match=r"MODEL\.DISALIGN\.CLS_LOSS='grw'"):
        model(_train_batch())
    # Training reads the json when it starts, and says which one is missing.
    with pytest.raises(Exception, match="lvis_v1_train"):
        Trainer(cfg)


def _train_batch():
    from detectron2.data import DatasetMapper

    cfg = tiny_cfg(opts=["INPUT.RANDOM_FLIP", "none"])
    mapper = DatasetMapper(cfg, is_train=True)
    return [mapper(d) for d in DatasetCatalog.get("tiny_train")[:2]]


def test_installed_weights_are_the_grw_weights_of_the_training_counts(stage_one, tmp_path):
    from disalign_det.modeling import grw_class_weights

    path, _ = stage_one
    cfg = _stage_two_cfg(str(tmp_path), path, opts=["MODEL.DISALIGN.RHO", "0.5"])
    model = Trainer.build_model(cfg)
    heads = (model.roi_heads.box_predictor, model.roi_heads.mask_head)
    assert not any(h.class_weights_installed for h in heads)
    counts = install_class_weights(model, cfg)
    assert counts.tolist() == _tiny_counts("tiny_train").tolist()
    want = grw_class_weights(counts, 0.5)
    for h in heads:
        assert torch.equal(h.class_weights, want)
    # Nothing needs them for a plain-CE config: no json is even looked at.
    plain = Trainer.build_model(
        _stage_two_cfg(
            str(tmp_path),
            path,
            opts=[
                *ABSENT_TRAIN,
                "MODEL.DISALIGN.CLS_LOSS",
                "ce",
                "MODEL.DISALIGN.MASK_LOSS",
                "bce",
            ],
        )
    )
    assert install_class_weights(plain, cfg) is None


def _probs(model, batch):
    """Softmax (NorCal-adjusted) of the box predictor on the val batch's proposals."""
    model.eval()
    with torch.no_grad():
        images = model.preprocess_image(batch)
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features)
        heads = model.roi_heads
        x = heads.box_head(heads.box_pooler([features[f] for f in heads.box_in_features],
                                            [p.proposal_boxes for p in proposals]))  # fmt: skip
        pred = heads.box_predictor
        return torch.cat(pred.predict_probs(pred(x), proposals))


def test_norcal_counts_travel_with_the_checkpoint(stage_one, tmp_path):

    path, _ = stage_one
    cfg = _stage_two_cfg(str(tmp_path), path, opts=NORCAL)
    trained = Trainer.build_model(cfg)
    DisAlignCheckpointer(trained, strict_stage_one=True).load(path)
    install_class_weights(trained, cfg)  # as at the start of training
    assert torch.equal(trained.roi_heads.box_predictor.class_counts, _tiny_counts("tiny_train"))
    DetectionCheckpointer(trained, str(tmp_path)).save("norcal")
    assert (
        "roi_heads.box_predictor.class_counts"
        in torch.load(tmp_path / "norcal.pth", weights_only=True)["model"]
    )
    # Evaluation elsewhere: no training json, no test dataset; the checkpoint alone.
    deployed = Trainer.build_model(_stage_two_cfg(str(tmp_path), "", opts=ABSENT_TRAIN + NORCAL))
    DisAlignCheckpointer(deployed).load(str(tmp_path / "norcal.pth"))
    batch = _val_batch(cfg)
    want = _probs(trained, batch)
    assert torch.equal(_probs(deployed, batch), want)
    plain = Trainer.build_model(_stage_two_cfg(str(tmp_path), "", opts=[*ABSENT_TRAIN]))
    DisAlignCheckpointer(plain).load(str(tmp_path / "norcal.pth"))
    assert (_probs(plain, batch) - want).abs().max() > 1e-3  # NorCal did change the probabilities


def test_norcal_on_a_stage_one_checkpoint_reads_the_test_json_categories(
    stage_one, tmp_path, tiny_dataset
):
    import json

    from disalign_det.data import register_lvis_format

    path, _ = stage_one
    opts = [*ABSENT_TRAIN, *NORCAL, "DATASETS.TEST", "('tiny_val',)"]
    model = Trainer.build_model(_stage_two_cfg(str(tmp_path), path, opts=opts))
    DisAlignCheckpointer(model).load(path)  # stage one: no class_counts in it
    batch = _val_batch(tiny_cfg())
    _probs(model, batch)
    with open(tiny_dataset["val_json"]) as f:
        cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    want = [float(c["instance_count"]) for c in cats]
    assert model.roi_heads.box_predictor.class_counts.tolist() == want

    # A test json whose categories lack the counts (they would be its own split's): clear error.
    with open(tiny_dataset["val_json"]) as f:
        data = json.load(f)
    for c in data["categories"]:
        c.pop("image_count", None), c.pop("instance_count", None)
    bare = tmp_path / "bare_val.json"
    bare.write_text(json.dumps(data))
    register_lvis_format("bare_val_norcal", str(bare), tiny_dataset["image_root"])
    opts = [*ABSENT_TRAIN, *NORCAL, "DATASETS.TEST", "('bare_val_norcal',)"]
    model = Trainer.build_model(_stage_two_cfg(str(tmp_path), path, opts=opts))
    DisAlignCheckpointer(model).load(path)
    with pytest.raises(ValueError, match=r"POSTHOC='norcal' needs the training class counts.*"
                                         r"carry no image_count/instance_count"):  # fmt: skip
        _probs(model, batch)
    model = Trainer.build_model(_stage_two_cfg(str(tmp_path), path, opts=[*ABSENT_TRAIN, *NORCAL]))
    DisAlignCheckpointer(model).load(path)
    with pytest.raises(ValueError, match="DATASETS.TEST is empty"):
        _probs(model, batch)


def test_disalign_checkpoint_must_fit_the_config(stage_one, tmp_path):
    path, _ = stage_one
    cfg = _stage_two_cfg(str(tmp_path), path)
    model = Trainer.build_model(cfg)
    DisAlignCheckpointer(model, strict_stage_one=True).load(path)
    DetectionCheckpointer(model, str(tmp_path)).save("stage2")
    stage2 = str(tmp_path / "stage2.pth")
    # Another class count.
    other = Trainer.build_model(
        _stage_two_cfg(str(tmp_path), "", opts=[*ABSENT_TRAIN, "MODEL.ROI_HEADS.NUM_CLASSES", "7"])
    )
    with pytest.raises(ValueError, match=r"does not fit this model .*\n.*logit_scale"):
        DisAlignCheckpointer(other).load(stage2)
    # A config without the calibration (the stage-one config, or calibration switched off).
    for opts in ([], ["MODEL.DISALIGN.BOX_CALIBRATION", "False"]):
        config = "synthetic/mask_rcnn_synth.yaml" if not opts else "synthetic/disalign_synth.yaml"
        plain = Trainer.build_model(tiny_cfg(config, opts=opts))
        with pytest.raises(ValueError, match="DisAlign checkpoint with .* calibration tensor"):
            DisAlignCheckpointer(plain).load(stage2)
    # Its own config loads it.
    DisAlignCheckpointer(Trainer.build_model(cfg)).load(stage2)
