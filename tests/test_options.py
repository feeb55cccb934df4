"""Every option of the detectron2 classes our subclasses override either works under DisAlign
(same result as the stock class at DisAlign's identity initialisation) or fails naming its config
key. See docs/options.md for the full list."""

import inspect

import pytest
import torch
from conftest import tiny_cfg
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from disalign_det import add_disalign_config
from disalign_det.compat import features
from disalign_det.engine import Trainer
from disalign_det.engine.loop import SimpleTrainLoop
from disalign_det.modeling import DisAlignFastRCNNOutputLayers, DisAlignMaskRCNNConvUpsampleHead

K, D = 5, 16
STAGE_TWO = "synthetic/disalign_synth.yaml"


def _cfg(opts=()):
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = K
    cfg.MODEL.DISALIGN.CLS_LOSS = "ce"  # GRW re-weighting is DisAlign's documented change
    cfg.MODEL.DISALIGN.MASK_LOSS = "bce"
    cfg.merge_from_list(list(opts))
    return cfg


def _proposals(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (7, 5):
        xy = torch.rand(n, 2, generator=g) * 40
        wh = torch.rand(n, 2, generator=g) * 20 + 4
        boxes = torch.cat([xy, xy + wh], dim=1)
        inst = Instances((64, 64))
        inst.proposal_boxes = Boxes(boxes)
        inst.gt_boxes = Boxes(boxes + torch.randn(n, 4, generator=g))
        inst.gt_classes = torch.randint(0, K + 1, (n,), generator=g)  # K = background
        out.append(inst)
    return out


def _box_pair(opts=(), **kwargs):
    """Stock and DisAlign predictors of one config with the same stage-one weights."""
    cfg = _cfg(opts)
    torch.manual_seed(0)
    stock = FastRCNNOutputLayers(cfg, ShapeSpec(channels=D), **kwargs)
    ours = DisAlignFastRCNNOutputLayers(cfg, ShapeSpec(channels=D), **kwargs)
    missing = ours.load_state_dict(stock.state_dict(), strict=False).missing_keys
    assert all(k.startswith(("logit_", "confidence_layer")) for k in missing), missing
    return stock, ours


def _losses(predictor, x, proposals):
    with EventStorage(0):  # the predictors log classification statistics
        return predictor.losses(predictor(x), proposals)


def _assert_same_losses(opts=(), **kwargs):
    stock, ours = _box_pair(opts, **kwargs)
    x, proposals = torch.randn(12, D), _proposals()
    a, b = _losses(stock, x, proposals), _losses(ours, x, proposals)
    assert a.keys() == b.keys() == {"loss_cls", "loss_box_reg"}
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), (k, a[k], b[k])
    return b


def _default_losses():
    _, ours = _box_pair()
    return _losses(ours, torch.randn(12, D), _proposals())


def test_cls_agnostic_bbox_reg():
    stock, ours = _box_pair(["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"])
    assert ours.bbox_pred.out_features == 4  # one box per RoI, not K
    _assert_same_losses(["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"])


def test_smooth_l1_beta():
    torch.manual_seed(1)
    got = _assert_same_losses(["MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", "5.0"])
    torch.manual_seed(1)
    default = _default_losses()
    assert not torch.allclose(got["loss_box_reg"], default["loss_box_reg"])  # it is honoured


_REG_TYPES = ["giou"] + [
    t
    for t in ("diou", "ciou")
    if t in inspect.getsource(__import__("detectron2.modeling.box_regression").modeling)
]


@pytest.mark.parametrize("loss_type", _REG_TYPES)
def test_bbox_reg_loss_type(loss_type):
    _assert_same_losses(["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", loss_type])


def test_bbox_reg_loss_weight():
    torch.manual_seed(2)
    got = _assert_same_losses(["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", "3.0"])
    torch.manual_seed(2)
    default = _default_losses()
    assert torch.allclose(got["loss_box_reg"], 3.0 * default["loss_box_reg"], atol=1e-6)


def test_predictor_loss_weight():
    # The constructor's loss_weight (LazyConfig / explicit arguments): a float or a dict per loss.
    torch.manual_seed(3)
    got = _assert_same_losses(loss_weight={"loss_cls": 0.25, "loss_box_reg": 2.0})
    torch.manual_seed(3)
    default = _default_losses()
    assert torch.allclose(got["loss_cls"], 0.25 * default["loss_cls"], atol=1e-6)
    torch.manual_seed(3)
    _assert_same_losses(loss_weight=0.5)


@pytest.mark.parametrize(
    "opts",
    [
        ["TEST.DETECTIONS_PER_IMAGE", "3"],
        ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.19"],
        ["MODEL.ROI_HEADS.NMS_THRESH_TEST", "0.1"],
    ],
    ids=["DETECTIONS_PER_IMAGE", "SCORE_THRESH_TEST", "NMS_THRESH_TEST"],
)
def test_inference_options(opts):
    # A low score threshold (unless it is the option), so that the other options decide.
    low = [] if "SCORE" in opts[0] else ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    stock, ours = _box_pair(opts + low)
    stock.eval(), ours.eval()
    x, proposals = torch.randn(12, D) * 3, _proposals()
    with torch.no_grad():
        a, _ = stock.inference(stock(x), proposals)
        b, _ = ours.inference(ours(x), proposals)
    for ia, ib in zip(a, b):
        assert len(ia) == len(ib) > 0
        assert torch.equal(ia.pred_classes, ib.pred_classes)
        assert torch.allclose(ia.scores, ib.scores, atol=1e-6)
        assert torch.allclose(ia.pred_boxes.tensor, ib.pred_boxes.tensor, atol=1e-5)
    if opts[0] == "TEST.DETECTIONS_PER_IMAGE":
        assert max(len(i) for i in b) == 3


@pytest.mark.skipif(
    not features.has_federated_loss(),
    reason="detectron2 v0.6 has no USE_SIGMOID_CE / USE_FED_LOSS (keys absent from its config)",
)
@pytest.mark.parametrize(
    "opts",
    [
        ["MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "True"],
        [
            "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE",
            "True",
            "MODEL.ROI_BOX_HEAD.USE_FED_LOSS",
            "True",
            "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES",
            "3",
        ],
    ],
    ids=["sigmoid", "federated"],
)
def test_sigmoid_or_federated_stage_one_is_never_silently_different(tiny_dataset, opts):
    # A sigmoid/federated stage one loaded into the DisAlign delta: at the identity
    # initialisation it must predict exactly what the stage one predicts, or refuse clearly.
    stage_one_cfg = tiny_cfg(opts=opts + ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    stage_one = build_model(stage_one_cfg).eval()
    try:
        delta = build_model(tiny_cfg(STAGE_TWO, opts=opts + ["MODEL.DEVICE", "cpu"]))
    except ValueError as e:
        assert "USE_SIGMOID_CE" in str(e)
        return
    delta.load_state_dict(stage_one.state_dict(), strict=False)
    delta.eval()
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.rand(3, 64, 64, generator=g) * 255, "height": 64, "width": 64}]
    with torch.no_grad():
        a, b = stage_one(inputs)[0]["instances"], delta(inputs)[0]["instances"]
    assert len(a) == len(b)
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert torch.allclose(a.scores, b.scores, atol=1e-5)


def _mask_inputs(n=6, side=14):
    g = torch.Generator().manual_seed(0)
    inst = Instances((64, 64))
    xy = torch.rand(n, 2, generator=g) * 30
    inst.proposal_boxes = Boxes(torch.cat([xy, xy + 20], dim=1))
    inst.gt_classes = torch.randint(0, K, (n,), generator=g)
    inst.gt_masks = BitMasks(torch.rand(n, 64, 64, generator=g) > 0.5)
    return torch.randn(n, 8, side, side, generator=g), [inst]


def test_vis_period_stores_the_stock_mask_images():
    cfg = _cfg(["VIS_PERIOD", "1", "MODEL.ROI_MASK_HEAD.CONV_DIM", "8"])
    shape = ShapeSpec(channels=8, width=14, height=14)
    torch.manual_seed(0)
    stock = MaskRCNNConvUpsampleHead(cfg, shape)
    ours = DisAlignMaskRCNNConvUpsampleHead(cfg, shape)
    ours.load_state_dict(stock.state_dict(), strict=False)
    x, instances = _mask_inputs()
    images = []
    for head in (stock, ours):
        with EventStorage(0) as storage:
            head.train()
            head(x, [i for i in instances])
            images.append({name: img for name, img, _ in storage._vis_data})
    assert images[0].keys() == images[1].keys() and len(images[0]) == len(x)
    for name in images[0]:
        assert torch.allclose(
            torch.as_tensor(images[0][name]), torch.as_tensor(images[1][name]), atol=1e-5
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="float16 AMP runs on CUDA machines")
def test_amp_without_cuda_names_the_key(tiny_dataset, tmp_path):
    # AMP runs on CPU in bfloat16 (tests/test_amp.py); float16 needs CUDA's grad scaler.
    opts = ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "float16"]
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION"):
        Trainer(tiny_cfg(output_dir=str(tmp_path), opts=opts))


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, batch):
        return {"loss_a": (self.w * batch).sum()}


@pytest.mark.skipif(
    not features.trainer_supports_async_write_metrics(),
    reason="detectron2 v0.6 has no SimpleTrainer(async_write_metrics=...)",
)
def test_async_metric_writing():
    model = _Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SimpleTrainLoop(
        model, iter(lambda: torch.ones(3), None), opt, async_write_metrics=True
    )
    with EventStorage(0) as storage:
        trainer.iter = 0
        trainer.run_step()
        trainer.concurrent_executor.shutdown(wait=True)
        assert storage.latest()["total_loss"][0] == pytest.approx(3.0)
    assert torch.allclose(model.w.detach(), torch.full((3,), 0.9))  # the step was applied


def _rpn_inputs():
    from detectron2.structures import ImageList

    g = torch.Generator().manual_seed(0)
    images = ImageList(torch.zeros(2, 3, 64, 64), [(64, 64), (64, 64)])
    features = {"res4": torch.randn(2, 8, 4, 4, generator=g)}
    gts = []
    for _ in range(2):
        inst = Instances((64, 64))
        xy = torch.rand(3, 2, generator=g) * 30
        inst.gt_boxes = Boxes(torch.cat([xy, xy + 24], dim=1))
        gts.append(inst)
    return images, features, gts


@pytest.mark.parametrize(
    "opts",
    [
        ["MODEL.RPN.LOSS_WEIGHT", "0.5", "MODEL.RPN.BBOX_REG_LOSS_WEIGHT", "2.0"],
        ["MODEL.RPN.BBOX_REG_LOSS_TYPE", "giou"],
        ["MODEL.RPN.SMOOTH_L1_BETA", "0.3"],
    ],
    ids=["LOSS_WEIGHT", "BBOX_REG_LOSS_TYPE", "SMOOTH_L1_BETA"],
)
def test_rpn_options(opts):
    from detectron2.modeling.proposal_generator import build_proposal_generator

    shape = {"res4": ShapeSpec(channels=8, stride=16)}
    stock_cfg, ours_cfg = _cfg(opts), _cfg(opts + ["MODEL.PROPOSAL_GENERATOR.NAME", "DisAlignRPN"])
    torch.manual_seed(0)
    stock = build_proposal_generator(stock_cfg, shape)
    ours = build_proposal_generator(ours_cfg, shape)
    ours.load_state_dict(stock.state_dict())
    results = []
    for rpn in (stock, ours):
        torch.manual_seed(1)  # anchor sampling
        with EventStorage(0):
            results.append(rpn(*_rpn_inputs()))
    (pa, la), (pb, lb) = results
    assert la.keys() == lb.keys() == {"loss_rpn_cls", "loss_rpn_loc"}
    for k in la:
        assert torch.allclose(la[k], lb[k]), k
    for a, b in zip(pa, pb):
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)


def test_cascade_stages_keep_their_options():
    from detectron2.modeling.roi_heads import build_roi_heads

    opts = [
        "MODEL.ROI_HEADS.IN_FEATURES",
        "['res4']",
        "MODEL.ROI_BOX_HEAD.NAME",
        "FastRCNNConvFCHead",
        "MODEL.ROI_BOX_HEAD.NUM_FC",
        "1",
        "MODEL.ROI_BOX_HEAD.FC_DIM",
        "16",
        "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG",
        "True",
        "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE",
        "giou",
        "TEST.DETECTIONS_PER_IMAGE",
        "7",
        "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS",
        "((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (40.0, 40.0, 20.0, 20.0))",
    ]
    shape = {"res4": ShapeSpec(channels=8, stride=16)}
    stock = build_roi_heads(_cfg(opts + ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads"]), shape)
    ours = build_roi_heads(_cfg(opts + ["MODEL.ROI_HEADS.NAME", "DisAlignCascadeROIHeads"]), shape)
    assert len(stock.box_predictor) == len(ours.box_predictor) == 3
    for a, b in zip(stock.box_predictor, ours.box_predictor):
        assert isinstance(b, DisAlignFastRCNNOutputLayers)
        assert a.box2box_transform.weights == b.box2box_transform.weights
        assert a.bbox_pred.out_features == b.bbox_pred.out_features == 4  # class-agnostic
        for attr in ("box_reg_loss_type", "test_topk_per_image", "smooth_l1_beta"):
            assert getattr(a, attr) == getattr(b, attr), attr


def test_mask_head_norm_and_loss_weight():
    cfg = _cfg(["MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.ROI_MASK_HEAD.NUM_CONV", "2"])
    cfg.MODEL.ROI_MASK_HEAD.NORM = "GN"
    shape = ShapeSpec(channels=8, width=14, height=14)
    losses, state = [], None
    for cls in (MaskRCNNConvUpsampleHead, DisAlignMaskRCNNConvUpsampleHead):
        torch.manual_seed(0)
        head = cls(cfg, shape, loss_weight=2.5)
        if state is not None:
            head.load_state_dict(state, strict=False)
        state = head.state_dict()
        assert any(isinstance(m, torch.nn.GroupNorm) for m in head.modules())
        x, instances = _mask_inputs()
        with EventStorage(0):
            head.train()
            losses.append(head(x, instances)["loss_mask"])
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    torch.manual_seed(0)
    plain = MaskRCNNConvUpsampleHead(cfg, shape)
    x, instances = _mask_inputs()
    with EventStorage(0):
        assert torch.allclose(losses[0], 2.5 * plain(x, instances)["loss_mask"], atol=1e-6)
