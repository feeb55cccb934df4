"""Mixed precision on CPU: under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the calibration and
the GRW / federated / mask losses are computed in float32, stage two at init still predicts what
stage one predicts, and a stage-two step stays finite and close to float32; for the softmax, the
cosine and (detectron2 main) the sigmoid / federated classifiers.

Bounds, with u = 2^-8 the unit roundoff of bfloat16 (8 significand bits; round to nearest errs by
at most u / 2 relative):

* identity at init: the stage-two class logits are the stage-one logits cast to float32, bit for bit
  (the calibration at init adds exactly 0). The stock head then takes its probability of the
  bfloat16 logits in bfloat16, ours in float32 from the same values, so the scores differ by the
  rounding of one probability to bfloat16: |p_ours - p_stock| <= u * p (twice the round-to-nearest
  bound, for the rounding inside the stock's bfloat16 softmax / sigmoid). Boxes are equal; a
  score that moved by u * p may cross the score threshold or swap two boxes in NMS, so up to 5%
  of the detections may be in one set only; pasted masks agree on >= 99% of the pixels.
* a stage-two step: every matmul / conv of the model runs on bfloat16-rounded inputs (relative
  error u / 2 each) with float32 accumulation, through a ResNet-FPN, the RPN, the box head's two
  FC layers and the mask head's four convs (~12 layers): relative errors of a few percent in the
  logits, of the order of 12 * u ~ 5%. The losses (averages over many RoIs / pixels) are asked to
  agree to 5% and the calibration gradients to a cosine of 0.99, with the same proposals and the
  same sampled RoIs (fixed seed): a wrong dtype (a loss in bfloat16, a calibration in bfloat16
  whose gradient rounds away) or a device/dtype bug breaks this, bfloat16 rounding does not.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from device_common import (
    classifier_params,
    device_batch,
    model_pair,
    rect_dataset,
)
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.utils.events import EventStorage

from disalign_det.modeling import (
    DisAlignFastRCNNOutputLayers,
    DisAlignMaskRCNNConvUpsampleHead,
    weighted_cross_entropy,
    weighted_mask_bce,
    weighted_sigmoid_cross_entropy,
)

AMP = dict(device_type="cpu", dtype=torch.bfloat16)
U = 2.0**-8  # unit roundoff of bfloat16
LOSS_RTOL = 0.05  # a stage-two step under bfloat16 vs float32 (see the module docstring)
GRAD_COSINE = 0.99
K, D, R = 6, 32, 40


@pytest.fixture(scope="module")
def rects(tmp_path_factory):
    return rect_dataset(str(tmp_path_factory.mktemp("rects")))


def _move_calibration(model, seed=1):
    """beta, gamma and the confidence layers off their identity start (a stage two under way)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name or "logit_bias" in name or "confidence_layer" in name:
                p.add_(torch.randn(p.shape, generator=g).to(p) * 0.3)


# ---- the calibration and the losses --------------------------------------------------------------


def test_box_calibration_is_float32_and_exact_under_autocast():
    torch.manual_seed(0)
    pred = DisAlignFastRCNNOutputLayers(
        ShapeSpec(channels=D), box2box_transform=Box2BoxTransform((10, 10, 5, 5)), num_classes=K
    )
    x = torch.randn(R, D)
    with torch.autocast(**AMP):
        z = pred.cls_score(x)
        scores, _ = pred(x)
    assert z.dtype == torch.bfloat16 and scores.dtype == torch.float32
    assert torch.equal(scores, z.float())  # identity at init, bit for bit

    _move_calibration(pred)
    with torch.autocast(**AMP):
        z = pred.cls_score(x).double()
        scores, _ = pred(x)
        s_half = torch.sigmoid(pred.confidence_layer(x))  # what a bfloat16 s(x) would be
    w, b = pred.confidence_layer.weight.double(), pred.confidence_layer.bias.double()
    s = torch.sigmoid(x.double() @ w.T + b)  # (R, 1), in float64
    beta, gamma = pred.logit_scale.double(), pred.logit_bias.double()
    fg = z[:, :-1] + s * ((beta - 1) * z[:, :-1] + gamma)  # z' = z + s ((beta - 1) z + gamma)
    torch.testing.assert_close(scores[:, :-1].double(), fg, rtol=1e-5, atol=1e-5)
    assert torch.equal(scores[:, -1].double(), z[:, -1])  # background logit passes unchanged
    # The bound is tight enough to see a bfloat16 s(x): it errs by far more than 1e-5.
    assert (s_half.double() - s).abs().max() > 1e-4


def test_mask_calibration_is_float32_under_autocast():
    torch.manual_seed(0)
    head = DisAlignMaskRCNNConvUpsampleHead(
        ShapeSpec(channels=8, width=7, height=7), num_classes=K, conv_dims=[8, 8]
    )
    _move_calibration(head)
    feats = torch.randn(5, 8, 14, 14)
    classes = torch.tensor([0, 3, 5, 3, 1])
    with torch.autocast(**AMP):
        logits = head._used_channel_logits(feats.bfloat16(), classes)
    assert logits.dtype == torch.float32
    f = feats.bfloat16().double()
    m = torch.einsum("rchw,rc->rhw", f, head.predictor.weight[classes, :, 0, 0].double())
    m = m + head.predictor.bias[classes].double()[:, None, None]
    conf = head.confidence_layer
    s = torch.sigmoid(torch.einsum("rchw,c->rhw", f, conf.weight[0, :, 0, 0].double()) + conf.bias)
    beta = head.logit_scale[classes].double()[:, None, None]
    gamma = head.logit_bias[classes].double()[:, None, None]
    # The mask logits m themselves come from a bfloat16 matmul: within u of their magnitude.
    tol = U * m.abs().max().item()
    torch.testing.assert_close(
        logits.double(), m + s * ((beta - 1) * m + gamma), rtol=0, atol=tol * beta.max().item()
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_are_float32_and_equal_the_float32_losses(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(R, K + 1, generator=g) * 4).to(dtype)
    labels = torch.randint(0, K + 1, (R,), generator=g)
    weights = torch.rand(K + 1, generator=g) + 0.5
    mask = (torch.rand(K, generator=g) > 0.3).float()
    mlogits = (torch.randn(R, 14, 14, generator=g) * 4).to(dtype)
    gt = torch.rand(R, 14, 14, generator=g) > 0.5
    cases = [
        (weighted_cross_entropy, (logits, labels, weights)),
        (weighted_cross_entropy, (logits, labels)),
        (weighted_sigmoid_cross_entropy, (logits, labels, weights, mask)),
        (weighted_sigmoid_cross_entropy, (logits, labels)),
        (weighted_mask_bce, (mlogits, gt, weights[labels])),
        (weighted_mask_bce, (mlogits, gt)),
    ]
    for fn, args in cases:
        with torch.autocast(**AMP):
            loss = fn(*args)
        assert loss.dtype == torch.float32, fn.__name__
        # The half logits are cast to float32 exactly: the same loss as from float32 logits.
        reference = fn(args[0].float(), *args[1:])
        torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    # Empty batches: a float32 zero as well.
    with torch.autocast(**AMP):
        empty = weighted_cross_entropy(logits[:0], labels[:0], weights)
    assert empty.dtype == torch.float32 and empty.item() == 0


def test_sigmoid_loss_sum_does_not_overflow_float16():
    """R x K binary terms of ~30 each sum to ~2e6, beyond float16's 65504, before the division by
    the sum of weights: the loss must still be the float64 value (it is summed in float32)."""
    g = torch.Generator().manual_seed(0)
    num_classes, rois = 1203, 64
    logits = ((torch.rand(rois, num_classes + 1, generator=g) * 10 + 25)).half()
    labels = torch.randint(0, num_classes, (rois,), generator=g)
    weights = torch.rand(num_classes + 1, generator=g) + 0.5
    loss = weighted_sigmoid_cross_entropy(logits, labels, weights)
    z = logits.double()[:, :-1]
    target = F.one_hot(labels, num_classes + 1).double()[:, :-1]
    bce = F.binary_cross_entropy_with_logits(z, target, reduction="none")
    w = weights.double()[labels]
    numerator = (bce.sum(1) * w).sum()
    expected = numerator / w.sum()
    assert math.isfinite(loss.item()) and numerator.item() > 65504
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


# ---- the whole model ------------------------------------------------------------------------


def _outputs(model, batch, hook_module):
    """(detections, raw outputs of ``hook_module``) of an eval forward under bfloat16 autocast."""
    seen = []
    handle = hook_module.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad(), torch.autocast(**AMP):
            out = model(batch)
    finally:
        handle.remove()
    return out, seen[0]


def _key(inst, i):
    return (int(inst.pred_classes[i]), tuple(inst.pred_boxes.tensor[i].tolist()))


@pytest.mark.parametrize("classifier", classifier_params())
def test_identity_at_init_under_bf16_autocast(rects, classifier):
    opts = ["TEST.DETECTIONS_PER_IMAGE", "1000", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.2"]
    cfg1, m1, cfg2, m2 = model_pair(classifier, "cpu", opts)
    m1.eval(), m2.eval()
    batch = device_batch(cfg1, train=False, num=3)
    out1, (z1, d1) = _outputs(m1, batch, m1.roi_heads.box_predictor)
    out2, (z2, d2) = _outputs(m2, batch, m2.roi_heads.box_predictor)
    assert z1.dtype == torch.bfloat16 and z2.dtype == torch.float32
    assert torch.equal(z2, z1.float())  # the calibrated logits at init, bit for bit
    assert torch.equal(d1, d2)
    # Every probability of every RoI (before any threshold or NMS): within u * p.
    with torch.no_grad(), torch.autocast(**AMP):
        p1 = m1.roi_heads.box_predictor.predict_probs((z1, d1), [z1])[0].double()
        p2 = m2.roi_heads.box_predictor.predict_probs((z2, d2), [z2])[0].double()
    assert ((p1 - p2).abs() <= U * p2).all(), ((p1 - p2).abs() / p2).max()
    # Detections: a score moved by u * p can cross the score threshold or swap two overlapping
    # boxes in NMS, so the sets may differ by such borderline detections (at most 5%); the
    # detections in both have the same class and box, scores within u * p, the same masks.
    total = 0
    for a, b in zip(out1, out2):
        a, b = a["instances"], b["instances"]
        ka, kb = {_key(a, i): i for i in range(len(a))}, {_key(b, i): i for i in range(len(b))}
        common = sorted(set(ka) & set(kb))
        total += len(common)
        assert len(common) >= 0.95 * max(len(a), len(b)), (len(common), len(a), len(b))
        ia = torch.tensor([ka[k] for k in common], dtype=torch.long)
        ib = torch.tensor([kb[k] for k in common], dtype=torch.long)
        s1, s2 = a.scores[ia].double(), b.scores[ib].double()
        assert ((s1 - s2).abs() <= U * s2).all()
        agree = (a.pred_masks[ia] == b.pred_masks[ib]).flatten(1).double().mean(1)
        assert agree.min() >= 0.99, agree.min()  # pasted binary masks, per detection
    assert total >= 5, "the stage-one model must predict something for this test to mean anything"


def _step(model, batch, amp):
    """Losses and calibration gradients of one stage-two training step (seeded RoI sampling)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with EventStorage(), torch.autocast(**AMP, enabled=amp):
        losses = model(batch)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, grads


@pytest.mark.parametrize("classifier", classifier_params())
def test_stage_two_step_under_bf16_autocast_is_close_to_float32(rects, classifier):
    _, _, cfg2, m2 = model_pair(classifier, "cpu")
    _move_calibration(m2)
    m2.train()
    batch = device_batch(cfg2, train=True, num=2)
    ref_losses, ref_grads = _step(copy.deepcopy(m2), batch, amp=False)
    losses, grads = _step(m2, batch, amp=True)
    assert set(losses) == set(ref_losses) == {"loss_cls", "loss_mask"}
    for k, v in losses.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), k
        torch.testing.assert_close(v, ref_losses[k], rtol=LOSS_RTOL, atol=0)
    assert set(grads) == set(ref_grads) and grads
    for n, g in grads.items():
        ref = ref_grads[n]
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), n
        cosine = F.cosine_similarity(g.flatten().double(), ref.flatten().double(), dim=0)
        assert cosine >= GRAD_COSINE, (n, cosine.item())
