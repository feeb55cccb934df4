"""DisAlignMaskRCNNConvUpsampleHead: stock checkpoints load, identity at init, calibration maths on
the used channel only, GRW-weighted loss, gradients."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

import disalign_det  # noqa: F401
from disalign_det.modeling import DisAlignMaskRCNNConvUpsampleHead, grw_class_weights

K, C = 5, 8
SHAPE = ShapeSpec(channels=C, width=14, height=14)


def _heads(**kw):
    torch.manual_seed(0)
    stock = MaskRCNNConvUpsampleHead(SHAPE, num_classes=K, conv_dims=[C, C, C])
    ours = DisAlignMaskRCNNConvUpsampleHead(SHAPE, num_classes=K, conv_dims=[C, C, C], **kw)
    incompatible = ours.load_state_dict(stock.state_dict(), strict=False)
    assert sorted(incompatible.missing_keys) == sorted(
        k for k in ours.state_dict() if k.startswith(("logit_", "confidence_layer"))
    )
    assert not incompatible.unexpected_keys
    return stock, ours


def _pred_instances(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((56, 56))
    inst.pred_boxes = Boxes(torch.tensor([[2.0, 2.0, 30.0, 30.0]] * n))
    inst.pred_classes = torch.randint(0, K, (n,), generator=g)
    return inst


def _train_instances(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((56, 56))
    boxes = (
        torch.tensor([[4.0, 4.0, 40.0, 40.0]] * n).reshape(n, 4) + torch.rand(n, 4, generator=g) * 4
    )
    inst.proposal_boxes = Boxes(boxes)
    inst.gt_classes = torch.randint(0, K, (n,), generator=g)
    inst.gt_masks = BitMasks(torch.rand(n, 56, 56, generator=g) > 0.5)
    return inst


def test_identity_at_init_matches_stock_masks():
    stock, ours = _heads(calibrate=True)
    stock.eval(), ours.eval()
    x = torch.randn(6, C, 14, 14)
    a = stock(x, [_pred_instances(6)])[0].pred_masks
    b = ours(x, [_pred_instances(6)])[0].pred_masks
    assert a.shape == b.shape == (6, 1, 28, 28)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_used_channel_equals_full_computation_with_random_calibration():
    _, ours = _heads(calibrate=True)
    with torch.no_grad():
        ours.logit_scale.uniform_(0.3, 2.0)
        ours.logit_bias.normal_()
        ours.confidence_layer.weight.normal_()
    feats = torch.randn(7, C, 28, 28)
    classes = torch.randint(0, K, (7,))
    full = ours.predictor(feats)  # (R, K, M, M): what the stock head computes
    m = full[torch.arange(7), classes]
    s = torch.sigmoid(ours.confidence_layer(feats)[:, 0])
    beta = ours.logit_scale[classes][:, None, None]
    gamma = ours.logit_bias[classes][:, None, None]
    want = s * (beta * m + gamma) + (1 - s) * m
    torch.testing.assert_close(
        ours._used_channel_logits(feats, classes), want, rtol=1e-5, atol=1e-5
    )


def test_grw_mask_loss_and_gradients():
    w = grw_class_weights([300, 100, 30, 10, 3], 0.8)
    _, ours = _heads(calibrate=True, mask_loss="grw", class_weights=w)
    for name, p in ours.named_parameters():
        p.requires_grad_(name.startswith(("logit_", "confidence_layer")))
    with torch.no_grad():
        ours.logit_scale.uniform_(0.5, 1.5)
    ours.train()
    x = torch.randn(6, C, 14, 14)
    inst = _train_instances(6)
    with EventStorage():
        loss = ours(x, [inst])["loss_mask"]
    feats = ours._features(x)
    gt = inst.gt_masks.crop_and_resize(inst.proposal_boxes.tensor, 28)
    logits = ours._used_channel_logits(feats, inst.gt_classes)
    per_roi = F.binary_cross_entropy_with_logits(logits, gt.float(), reduction="none").mean((1, 2))
    rw = w[inst.gt_classes]
    assert loss.item() == pytest.approx(((rw * per_roi).sum() / rw.sum()).item(), rel=1e-5)
    loss.backward()
    for name in ("logit_scale", "logit_bias", "confidence_layer.weight"):
        assert dict(ours.named_parameters())[name].grad.abs().sum() > 0, name
    assert ours.predictor.weight.grad is None


def test_bce_loss_equals_stock_mask_loss():
    stock, ours = _heads(calibrate=False, mask_loss="bce")
    stock.train(), ours.train()
    x = torch.randn(5, C, 14, 14)
    with EventStorage():
        a = stock(x, [_train_instances(5, seed=4)])["loss_mask"]
        b = ours(x, [_train_instances(5, seed=4)])["loss_mask"]
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_no_foreground_is_finite_and_frozen_head_is_skipped():
    _, ours = _heads(calibrate=True)
    ours.train()
    empty = _train_instances(0)
    with EventStorage():
        loss = ours(torch.zeros(0, C, 14, 14), [empty])["loss_mask"]
    assert loss.item() == 0.0
    loss.backward()
    for p in ours.parameters():
        p.requires_grad_(False)
    with EventStorage():
        assert ours(torch.randn(2, C, 14, 14), [_train_instances(2)]) == {}


def test_class_agnostic_mask_head_calibrates_per_class():
    torch.manual_seed(0)
    head = DisAlignMaskRCNNConvUpsampleHead(
        SHAPE, num_classes=1, conv_dims=[C, C], num_calibrated_classes=K
    )
    assert head.logit_scale.shape == (K,)
    head.eval()
    inst = head(torch.randn(3, C, 14, 14), [_pred_instances(3)])[0]
    assert inst.pred_masks.shape == (3, 1, 28, 28)
