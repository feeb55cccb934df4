"""DisAlign on detectron2 main's sigmoid classifier (``USE_SIGMOID_CE``) and federated loss
(``USE_FED_LOSS``): rho = 0 is exactly the stock loss, GRW weights each RoI's binary terms, the
stage-two model predicts exactly what the stage one predicts at init. Skipped on detectron2 v0.6,
which has neither."""

import inspect
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import disalign_det  # noqa: F401
from disalign_det.engine import DisAlignCheckpointer, Trainer
from disalign_det.modeling import (
    DisAlignFastRCNNOutputLayers,
    grw_class_weights,
    install_class_weights,
    weighted_sigmoid_cross_entropy,
)

pytestmark = pytest.mark.skipif(
    "use_sigmoid_ce" not in inspect.signature(FastRCNNOutputLayers.__init__).parameters,
    reason="this detectron2 (v0.6) has no sigmoid classifier / federated loss",
)

K, D = 6, 16
COUNTS = [400, 60, 9, 2, 30, 120]
FED_WEIGHTS = torch.tensor([9.0, 4.0, 1.0, 0.5, 2.0, 6.0])  # image_count ** power
BOX2BOX = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))


def _kw(fed):
    return dict(
        use_sigmoid_ce=True,
        use_fed_loss=fed,
        get_fed_loss_cls_weights=lambda: FED_WEIGHTS.clone(),
        fed_loss_num_classes=4,
    )


def _pair(fed, **ours):
    torch.manual_seed(0)
    stock = FastRCNNOutputLayers(
        ShapeSpec(channels=D), box2box_transform=BOX2BOX, num_classes=K, **_kw(fed)
    )
    pred = DisAlignFastRCNNOutputLayers(
        ShapeSpec(channels=D), box2box_transform=BOX2BOX, num_classes=K, **_kw(fed), **ours
    )
    if not ours.get("cosine"):  # (the cosine classifier has no bias)
        incompatible = pred.load_state_dict(stock.state_dict(), strict=False)
        assert not incompatible.unexpected_keys
    return stock, pred


def _proposals(labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    inst = Instances((64, 64))
    xy = torch.rand(n, 2, generator=g) * 30
    inst.proposal_boxes = Boxes(torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 20], 1))
    inst.gt_boxes = Boxes(inst.proposal_boxes.tensor + torch.randn(n, 4, generator=g))
    inst.gt_classes = torch.as_tensor(labels)
    return [inst]


# Two foreground classes and background: the federated loss (4 classes) samples 1 more negative.
LABELS = [0, 0, 3, K, K, 3, K, 0, K, K]


def _losses(model, x, proposals, seed):
    torch.manual_seed(seed)  # the federated loss samples its negative classes
    with EventStorage():
        return model.losses(model(x), proposals)


@pytest.mark.parametrize("fed", [False, True])
@pytest.mark.parametrize("cls_loss", ["ce", "grw"])
def test_rho_zero_is_exactly_the_stock_sigmoid_and_federated_loss(fed, cls_loss):
    kw = dict(cls_loss=cls_loss, class_weights=grw_class_weights(COUNTS, 0.0))
    stock, pred = _pair(fed, **kw)
    x, proposals = torch.randn(len(LABELS), D), _proposals(LABELS)
    for seed in range(4):
        ours, theirs = _losses(pred, x, proposals, seed), _losses(stock, x, proposals, seed)
        assert torch.equal(ours["loss_cls"], theirs["loss_cls"]), (seed, ours, theirs)
        assert torch.equal(ours["loss_box_reg"], theirs["loss_box_reg"])
    if fed:  # the sampled subset matters, so the seeds above tested the same draws
        draws = {_losses(stock, x, proposals, s)["loss_cls"].item() for s in range(4)}
        assert len(draws) > 1
    if not fed:  # the pure function on the same inputs: the stock sigmoid loss
        scores, _ = stock(x)
        labels = proposals[0].gt_classes
        want = stock.sigmoid_cross_entropy_loss(scores, labels)
        assert torch.equal(weighted_sigmoid_cross_entropy(scores, labels), want)


@pytest.mark.parametrize("fed", [False, True])
def test_grw_weights_each_rois_binary_terms_by_its_gt_class(fed):
    w = grw_class_weights(COUNTS, 0.8)
    _, pred = _pair(fed, cls_loss="grw", class_weights=w)
    for name, p in pred.named_parameters():
        p.requires_grad_(name.startswith(("logit_", "confidence_layer")))
    with torch.no_grad():
        pred.logit_scale.uniform_(0.5, 2.0)
        pred.logit_bias.normal_()
    x, proposals = torch.randn(len(LABELS), D), _proposals(LABELS)
    loss = _losses(pred, x, proposals, seed=3)["loss_cls"]
    labels = proposals[0].gt_classes
    torch.manual_seed(3)
    mask = pred._fed_loss_class_mask(labels) if fed else torch.ones(K)
    # The labels' classes (the background counts among the 4 kept, as in detectron2) plus one
    # sampled negative.
    if fed:
        assert mask.shape == (K,) and mask[[0, 3]].tolist() == [1, 1] and mask.sum() == 3
    scores, _ = pred(x)
    target = F.one_hot(labels, K + 1)[:, :K].float()
    bce = F.binary_cross_entropy_with_logits(scores[:, :K], target, reduction="none")
    roi_w = w[labels]  # background RoIs weight 1
    want = (roi_w[:, None] * bce * mask).sum() / roi_w.sum()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    loss.backward()
    assert pred.logit_scale.grad.abs().sum() > 0


@pytest.mark.parametrize("fed", [False, True])
def test_inference_is_the_stock_sigmoid_at_init(fed):
    stock, pred = _pair(fed, calibrate=True)
    x = torch.randn(20, D)
    proposals = _proposals([K] * 20)
    ours, theirs = pred(x), stock(x)
    assert torch.equal(ours[0], theirs[0])
    (p,) = pred.predict_probs(ours, proposals)
    assert torch.equal(p, torch.sigmoid(theirs[0]))
    (a,), _ = pred.inference(ours, proposals)
    (b,), _ = stock.inference(theirs, proposals)
    assert len(a) == len(b) > 0 and torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)


def test_cosine_classifier_with_sigmoid():
    _, pred = _pair(
        False, cosine=True, cls_loss="grw", class_weights=grw_class_weights(COUNTS, 0.8)
    )
    x, proposals = torch.randn(len(LABELS), D), _proposals(LABELS)
    loss = _losses(pred, x, proposals, 0)["loss_cls"]
    scores, _ = pred(x)
    want = weighted_sigmoid_cross_entropy(scores, proposals[0].gt_classes, pred.class_weights)
    assert torch.equal(loss, want) and torch.isfinite(loss)
    (p,) = pred.predict_probs((scores, None), proposals)
    assert torch.equal(p, scores.sigmoid())


def test_norcal_with_sigmoid_fails_clearly():
    with pytest.raises(ValueError, match=r"MODEL\.DISALIGN\.POSTHOC='norcal'.*USE_SIGMOID_CE"):
        _pair(False, posthoc="norcal", class_counts=COUNTS)


def test_federated_weights_are_not_read_at_build():
    def fail():
        raise AssertionError("read at build time")

    kw = dict(_kw(True), get_fed_loss_cls_weights=fail)
    pred = DisAlignFastRCNNOutputLayers(
        ShapeSpec(channels=D), box2box_transform=BOX2BOX, num_classes=K, **kw
    )
    assert not pred.fed_loss_cls_weights.any()  # read at the first loss, or from a checkpoint


# --------------------------------------------------------------------------------------------------
# Whole model from YAML: stage two from a stock sigmoid (federated) stage one
# --------------------------------------------------------------------------------------------------


def _yaml_opts(fed):
    return ["MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "True", "MODEL.ROI_BOX_HEAD.USE_FED_LOSS",
            str(fed), "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES", "3"]  # fmt: skip


@pytest.fixture(scope="module", params=[False, True], ids=["sigmoid", "sigmoid_fed"])
def sigmoid_stage_one(request, tiny_dataset, tmp_path_factory):
    fed = request.param
    out = str(tmp_path_factory.mktemp("sigmoid_stage1"))
    cfg = tiny_cfg(output_dir=out, opts=_yaml_opts(fed))
    torch.manual_seed(0)
    model = build_model(cfg)  # the stock StandardROIHeads with the stock sigmoid predictor
    assert type(model.roi_heads.box_predictor) is FastRCNNOutputLayers
    assert model.roi_heads.box_predictor.use_sigmoid_ce
    with torch.no_grad():
        head = model.roi_heads
        head.box_predictor.cls_score.weight.normal_(std=0.05)
        head.box_predictor.cls_score.bias.fill_(-1.0)
        head.mask_head.predictor.weight.normal_(std=0.1)
    DetectionCheckpointer(model, out).save("stage1")
    return os.path.join(out, "stage1.pth"), cfg, fed


def max_score_difference(stage_one_path, cfg1, cfg2):
    """Stage one and stage two (at init) on 3 val images: (instances compared, max |score diff|);
    asserts the same instances and identical masks."""
    for cfg in (cfg1, cfg2):
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    m1 = build_model(cfg1)
    DetectionCheckpointer(m1).load(stage_one_path)
    m2 = Trainer.build_model(cfg2)
    DisAlignCheckpointer(m2, strict_stage_one=True).load(stage_one_path)
    m1.eval(), m2.eval()
    mapper = DatasetMapper(cfg1, is_train=False)
    batch = [mapper(d) for d in DatasetCatalog.get("tiny_val")[:3]]
    with torch.no_grad():
        out1, out2 = m1(batch), m2(batch)
    total, worst = 0, 0.0
    for a, b in zip(out1, out2):
        a, b = a["instances"], b["instances"]
        assert len(a) == len(b)
        assert torch.equal(a.pred_classes, b.pred_classes)
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=0, atol=1e-5)
        assert torch.equal(a.pred_masks, b.pred_masks)
        total += len(a)
        if len(a):
            worst = max(worst, (a.scores - b.scores).abs().max().item())
    return total, worst


def test_stage_two_starts_from_the_sigmoid_stage_one_predictions(sigmoid_stage_one, tmp_path):
    path, cfg1, fed = sigmoid_stage_one
    cfg2 = tiny_cfg(
        "synthetic/disalign_synth.yaml", str(tmp_path), ["MODEL.WEIGHTS", path, *_yaml_opts(fed)]
    )
    total, worst = max_score_difference(path, cfg1.clone(), cfg2)
    assert total > 10, "the stage-one model must predict something for this test to mean anything"
    assert worst <= 1e-6


def test_sigmoid_stage_two_trains_from_yaml(sigmoid_stage_one, tmp_path):
    path, _, fed = sigmoid_stage_one
    opts = [
        "MODEL.WEIGHTS",
        path,
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.BASE_LR",
        "0.5",
        *_yaml_opts(fed),
    ]
    trainer = Trainer(tiny_cfg("synthetic/disalign_synth.yaml", str(tmp_path), opts))
    trainer.resume_or_load(resume=False)
    pred = trainer.model.roi_heads.box_predictor
    assert pred.sigmoid_ce and pred.use_fed_loss == fed and pred.class_weights_installed
    if fed:  # the stage one's sampling weights, from its checkpoint
        ckpt = torch.load(path, weights_only=True)["model"]
        assert torch.equal(
            pred.fed_loss_cls_weights, ckpt["roi_heads.box_predictor.fed_loss_cls_weights"]
        )
    trainer.train()
    assert not torch.equal(pred.logit_scale.detach(), torch.ones(pred.num_classes))
    assert torch.isfinite(torch.tensor(trainer.storage.latest()["loss_cls"][0]))


def test_install_class_weights_is_needed_for_sigmoid_grw(sigmoid_stage_one, tmp_path):
    path, _, fed = sigmoid_stage_one
    cfg = tiny_cfg("synthetic/disalign_synth.yaml", str(tmp_path),
                   ["MODEL.WEIGHTS", path, *_yaml_opts(fed)])  # fmt: skip
    model = Trainer.build_model(cfg)
    assert not model.roi_heads.box_predictor.class_weights_installed
    install_class_weights(model, cfg)
    assert model.roi_heads.box_predictor.class_weights_installed
