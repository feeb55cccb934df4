"""DisAlignFastRCNNOutputLayers: calibration, GRW loss, frozen losses, post-hoc options."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import disalign_det  # noqa: F401
from disalign_det.modeling import DisAlignFastRCNNOutputLayers, grw_class_weights

K, D = 4, 16
COUNTS = [400, 60, 9, 2]


def _make(**kw):
    torch.manual_seed(0)
    args = dict(
        input_shape=ShapeSpec(channels=D),
        box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
        num_classes=K,
    )
    args.update(kw)
    return DisAlignFastRCNNOutputLayers(**args)


def _stock_copy(pred):
    stock = FastRCNNOutputLayers(
        ShapeSpec(channels=D), box2box_transform=pred.box2box_transform, num_classes=K
    )
    missing, unexpected = stock.load_state_dict(pred.state_dict(), strict=False)
    assert not missing
    return stock


def _proposals(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((64, 64))
    xy = torch.rand(n, 2, generator=g) * 30
    inst.proposal_boxes = Boxes(torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 20], 1))
    inst.gt_boxes = Boxes(inst.proposal_boxes.tensor + torch.randn(n, 4, generator=g))
    inst.gt_classes = torch.randint(0, K + 1, (n,), generator=g)
    return [inst]


def test_identity_at_init_equals_stock_predictor():
    pred = _make(calibrate=True)
    stock = _stock_copy(pred)
    x = torch.randn(12, D)
    s1, d1 = pred(x)
    s0, d0 = stock(x)
    assert torch.equal(s1, s0) and torch.equal(d1, d0)
    # The confidence layer starts at N(0, 0.01) weights and zero bias.
    assert pred.confidence_layer.bias.item() == 0.0
    assert 0 < pred.confidence_layer.weight.std().item() < 0.05


def test_forward_equals_formula_with_random_calibration():
    pred = _make(calibrate=True)
    with torch.no_grad():
        pred.logit_scale.uniform_(0.2, 3.0)
        pred.logit_bias.normal_()
        pred.confidence_layer.weight.normal_()
        pred.confidence_layer.bias.fill_(0.3)
    x = torch.randn(9, D)
    z = pred.cls_score(x)
    s = torch.sigmoid(pred.confidence_layer(x))
    fg = s * (pred.logit_scale * z[:, :K] + pred.logit_bias) + (1 - s) * z[:, :K]
    scores, _ = pred(x)
    torch.testing.assert_close(scores[:, :K], fg, rtol=1e-5, atol=1e-5)
    # The background logit passes unchanged.
    assert torch.equal(scores[:, K], z[:, K])


def test_grw_loss_and_gradients_reach_calibration():
    w = grw_class_weights(COUNTS, 0.8)
    pred = _make(calibrate=True, cls_loss="grw", class_weights=w)
    for name, p in pred.named_parameters():
        p.requires_grad_(name.startswith(("logit_", "confidence_layer")))
    proposals = _proposals()
    x = torch.randn(12, D)
    with EventStorage():
        scores, deltas = pred(x)
        losses = pred.losses((scores, deltas), proposals)
    # bbox_pred is frozen: its loss is not even computed.
    assert set(losses) == {"loss_cls"}
    labels = proposals[0].gt_classes
    ce = -F.log_softmax(scores, 1)[torch.arange(12), labels]
    want = (w[labels] * ce).sum() / w[labels].sum()
    assert losses["loss_cls"].item() == pytest.approx(want.item(), rel=1e-5)
    losses["loss_cls"].backward()
    params = dict(pred.named_parameters())
    for name in ("logit_scale", "logit_bias"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    # At the identity init dz'/ds = (beta - 1) z + gamma = 0: s(x) only starts to learn once
    # beta or gamma moved (after the first step).
    assert params["confidence_layer.weight"].grad.abs().sum() == 0
    assert pred.cls_score.weight.grad is None

    with torch.no_grad():
        pred.logit_scale.add_(0.1)
    pred.zero_grad()
    with EventStorage():
        pred.losses(pred(x), proposals)["loss_cls"].backward()
    for name in ("logit_scale", "logit_bias", "confidence_layer.weight", "confidence_layer.bias"):
        assert params[name].grad.abs().sum() > 0, name


def test_plain_config_equals_stock_losses():
    pred = _make(calibrate=False, cls_loss="ce")
    stock = _stock_copy(pred)
    x = torch.randn(12, D)
    proposals = _proposals(seed=3)
    with EventStorage():
        ours = pred.losses(pred(x), proposals)
        theirs = stock.losses(stock(x), proposals)
    assert set(ours) == set(theirs) == {"loss_cls", "loss_box_reg"}
    for k in ours:
        assert ours[k].item() == pytest.approx(theirs[k].item(), rel=1e-6)


def test_empty_batch_losses_are_finite():
    pred = _make(calibrate=True, cls_loss="grw", class_weights=grw_class_weights(COUNTS, 0.8))
    inst = Instances((64, 64))
    inst.proposal_boxes = Boxes(torch.zeros(0, 4))
    inst.gt_boxes = Boxes(torch.zeros(0, 4))
    inst.gt_classes = torch.zeros(0, dtype=torch.long)
    with EventStorage():
        losses = pred.losses(pred(torch.zeros(0, D)), [inst])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_norcal_probabilities():
    pred = _make(calibrate=False, posthoc="norcal", posthoc_power=0.7, class_counts=COUNTS)
    pred.eval()
    x = torch.randn(5, D)
    scores, deltas = pred(x)
    p = F.softmax(scores, 1)
    n = torch.tensor(COUNTS, dtype=torch.float32)
    n = n / n.mean()
    fg = p[:, :K] / n**0.7
    want = torch.cat([fg, p[:, K:]], 1)
    want = want / want.sum(1, keepdim=True)
    (got,) = pred.predict_probs((scores, deltas), _proposals(5))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Rare classes gain relative to frequent ones.
    ratio_before = p[:, 3] / p[:, 0]
    ratio_after = got[:, 3] / got[:, 0]
    assert torch.all(ratio_after > ratio_before)


def test_tau_norm_logits():
    pred = _make(calibrate=False, posthoc="tau_norm", posthoc_power=1.0)
    with torch.no_grad():
        pred.cls_score.weight[:K] *= torch.tensor([5.0, 2.0, 1.0, 0.5])[:, None]
    x = torch.randn(6, D)
    pred.train()
    train_scores, _ = pred(x)
    torch.testing.assert_close(train_scores, pred.cls_score(x))  # training is untouched
    pred.eval()
    scores, _ = pred(x)
    w = pred.cls_score.weight
    norms = w[:K].norm(dim=1, keepdim=True)
    w_fg = w[:K] / norms * norms.mean()
    want = torch.cat(
        [x @ w_fg.T + pred.cls_score.bias[:K], x @ w[K:].T + pred.cls_score.bias[K:]], 1
    )
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)
    # tau = 0 is the identity.
    pred0 = _make(calibrate=False, posthoc="tau_norm", posthoc_power=0.0).eval()
    torch.testing.assert_close(pred0(x)[0], pred0.cls_score(x), rtol=1e-6, atol=1e-6)


def test_cosine_classifier_replaces_cls_score():
    pred = _make(calibrate=True, cosine=True, cosine_scale=20.0)
    assert type(pred.cls_score).__name__ == "CosineLinear"
    assert pred.cls_score.weight.shape == (K + 1, D)
    scores, _ = pred(torch.randn(3, D))
    assert scores.abs().max() <= 20.0 + 1e-4


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(cls_loss="focal"), "MODEL.DISALIGN.CLS_LOSS"),
        (dict(posthoc="magic"), "MODEL.DISALIGN.POSTHOC"),
        (dict(posthoc="tau_norm", cosine=True), "MODEL.DISALIGN.POSTHOC"),
        (dict(posthoc="norcal"), "MODEL.DISALIGN.POSTHOC"),
    ],
)
def test_bad_options_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        _make(**kw)
