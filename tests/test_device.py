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
  FC layers and the mask head's four convs (~12 layers): relative errors of the order of
  12 * u ~ 5% in the logits. Besides, the RPN ranks its proposals by bfloat16 objectness, so a
  few of the sampled RoIs (same seed) may differ. The losses are asked to agree to 10% (measured
  here: 0.01% to 5.2%) and the calibration gradients to a cosine of 0.98 (measured: >= 0.992):
  a loss or a calibration left in bfloat16 (its gradient rounds away), a wrong dtype or device
  breaks this, bfloat16 rounding does not.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from device_common import (
    AMP,
    classifier_params,
    device_batch,
    model_pair,
    move_calibration,
    outputs_with_hook,
    rect_dataset,
    same_detections,
    train_step,
)

from disalign_det.modeling import (
    DisAlignFastRCNNOutputLayers,
    DisAlignMaskRCNNConvUpsampleHead,
    weighted_cross_entropy,
    weighted_mask_bce,
    weighted_sigmoid_cross_entropy,
)

U = 2.0**-8  # unit roundoff of bfloat16
LOSS_RTOL = 0.10  # a stage-two step under bfloat16 vs float32 (see the module docstring)
GRAD_COSINE = 0.98
K, D, R = 6, 32, 40


@pytest.fixture(scope="module")
def rects(tmp_path_factory):
    return rect_dataset(str(tmp_path_factory.mktemp("rects")))


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

    move_calibration(pred)
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
    move_calibration(head)
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


@pytest.mark.parametrize("classifier", classifier_params(marks=[pytest.mark.slow]))
def test_identity_at_init_under_bf16_autocast(rects, classifier):
    opts = ["TEST.DETECTIONS_PER_IMAGE", "1000", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.2"]
    cfg1, m1, cfg2, m2 = model_pair(classifier, "cpu", opts)
    m1.eval(), m2.eval()
    batch = device_batch(cfg1, train=False, num=3)
    out1, (z1, d1) = outputs_with_hook(m1, batch, m1.roi_heads.box_predictor)
    out2, (z2, d2) = outputs_with_hook(m2, batch, m2.roi_heads.box_predictor)
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
    total = same_detections(out1, out2, score_rtol=U, min_common=0.95, min_mask_agree=0.99)
    assert total >= 5, "the stage-one model must predict something for this test to mean anything"


@pytest.mark.parametrize("classifier", classifier_params(marks=[pytest.mark.slow]))
def test_stage_two_step_under_bf16_autocast_is_close_to_float32(rects, classifier):
    _, _, cfg2, m2 = model_pair(classifier, "cpu")
    move_calibration(m2)
    m2.train()
    batch = device_batch(cfg2, train=True, num=2)
    ref_losses, ref_grads = train_step(copy.deepcopy(m2), batch, amp=False)
    losses, grads = train_step(m2, batch, amp=True)
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


# ---- device following, provable without a GPU: the "meta" device ---------------------------------


def test_buffers_and_losses_follow_the_module_device():
    """A module moved to another device ("meta" here: any tensor created on the CPU and mixed in
    raises) keeps its GRW weights and NorCal counts there when they are installed later, and the
    losses move CPU-given weights to the logits' device."""
    from disalign_det.modeling import grw_class_weights

    torch.manual_seed(0)
    box2box = Box2BoxTransform((10, 10, 5, 5))
    grw = DisAlignFastRCNNOutputLayers(
        ShapeSpec(channels=D), box2box_transform=box2box, num_classes=K, cls_loss="grw"
    ).to("meta")
    norcal = DisAlignFastRCNNOutputLayers(
        ShapeSpec(channels=D), box2box_transform=box2box, num_classes=K, posthoc="norcal",
        class_counts_fallback=((), "image_count"),
    ).to("meta")  # fmt: skip
    counts = [50, 20, 9, 4, 2, 1]
    grw.set_class_frequencies(counts)
    norcal.set_class_frequencies(counts)
    assert grw.grw_weights().device.type == "meta" and norcal.class_counts.device.type == "meta"

    logits = torch.randn(R, K + 1, device="meta")
    labels = torch.zeros(R, dtype=torch.long, device="meta")
    weights = grw_class_weights(counts, 0.8)  # a CPU tensor
    for loss in (
        weighted_cross_entropy(logits, labels, weights),
        weighted_sigmoid_cross_entropy(logits, labels, weights, torch.ones(K, device="meta")),
        weighted_mask_bce(torch.randn(R, 4, 4, device="meta"),
                          torch.ones(R, 4, 4, dtype=torch.bool, device="meta"),
                          weights[:R % K + 1].repeat(R)[:R]),
    ):  # fmt: skip
        assert loss.device.type == "meta" and loss.dtype == torch.float32
    with torch.no_grad():
        scores, deltas = grw(torch.randn(R, D, device="meta"))
    assert scores.device.type == "meta" and scores.dtype == torch.float32
