"""GOL, the Gumbel optimised loss (disalign_det/modeling/stage_one_losses.py): the loss and its
gradient against the formulas written out here with Python floats on hand-made inputs, the stable
form against the naive one, the authors' clamping and bias init, its activation in the box
predictor, DisAlign's GRW through it, FRACAL on it, NorCal refused, and its configs. GOL does not
use detectron2's sigmoid classifier, so it runs on detectron2 v0.6 as well as main. (Predictor
training / identity at init / the end-to-end DisAlign load: tests/test_stage_one_losses.py, whose
LOSS_PARAMS include "gol".)"""

import math
import os

import pytest
import torch
from common import CONFIGS
from common import HAND_K as K
from common import HAND_LABELS as Y
from common import HAND_LOGITS as Z
from common import one_image_proposals
from conftest import tiny_cfg
from detectron2.config import LazyCall as L
from detectron2.config import get_cfg, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.utils.events import EventStorage

from disalign_det.compat.features import has_federated_loss
from disalign_det.config import add_disalign_config
from disalign_det.modeling import DisAlignFastRCNNOutputLayers
from disalign_det.modeling.fracal import fracal_adjustments
from disalign_det.modeling.stage_one_losses import StageOneLoss, gol_loss, gumbel_probs

# 3 foreground classes + background; 5 RoIs, two of them background (tests/common.py).
D = 8
NO_CLAMP = dict(clamp_min=-1e9, clamp_max=1e9)


def _g(z):
    # G(z) = exp(-exp(-z))
    return math.exp(-math.exp(-z))


def _gumbel_bce(z, y):
    # -[y log G(z) + (1 - y) log(1 - G(z))], naively (y is 0 or 1: only its term is evaluated)
    g = _g(z)
    return -math.log(g) if y == 1 else -math.log(1 - g)


def _dloss_dz(z, y):
    # y = 1: d/dz exp(-z) = -exp(-z); y = 0: d/dz -log(1 - G) = exp(-z) G / (1 - G), with
    # 1 - G = -expm1(-exp(-z)) (exact for large z, where 1 - exp(...) cancels).
    g = _g(z)
    return -math.exp(-z) if y == 1 else math.exp(-z) * g / -math.expm1(-math.exp(-z))


def _zy(dtype=torch.float64):
    return torch.tensor(Z, dtype=dtype), torch.tensor(Y)


def test_gumbel_activation():
    z, _ = _zy()
    p = gumbel_probs(z)
    for i in range(5):
        for j in range(K + 1):
            assert p[i, j].item() == pytest.approx(math.exp(-math.exp(-Z[i][j])), rel=1e-12)
    # In [0, 1] for every finite z, 0 and 1 at the extremes.
    ext = gumbel_probs(torch.tensor([-1e4, -100.0, 100.0, 1e4]))
    assert ext.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_gol_loss_against_the_formula():
    z, y = _zy()
    want = 0.0
    for i in range(5):
        for j in range(K):  # the background column is not a term
            want += _gumbel_bce(Z[i][j], 1.0 if Y[i] == j else 0.0)
    want /= 5
    assert gol_loss(z, y).item() == pytest.approx(want, rel=1e-12)
    assert StageOneLoss("gol", K)(z, y).item() == pytest.approx(want, rel=1e-6)  # float32
    # The background logit does not matter.
    z2 = z.clone()
    z2[:, K] = torch.tensor([5.0, -3.0, 0.0, 9.0, -7.0])
    assert gol_loss(z2, y).item() == gol_loss(z, y).item()


def test_clamping_is_the_authors():
    # z clamped to [-4, 10] before the loss: a positive at -6 costs exp(4), a negative at 12
    # costs -log(1 - G(10)); neither gets a gradient.
    z = torch.tensor([[-6.0, 12.0, 0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0])
    loss = gol_loss(z, y, -4.0, 10.0)
    want = math.exp(4.0) - math.log(-math.expm1(-math.exp(-10.0))) + _gumbel_bce(0.5, 0)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    assert z.grad[0, 0].item() == 0.0 and z.grad[0, 1].item() == 0.0
    assert z.grad[0, 2].item() == pytest.approx(_dloss_dz(0.5, 0), rel=1e-12)
    # Other bounds (MODEL.ROI_BOX_HEAD.GOL.CLAMP_MIN / CLAMP_MAX).
    assert gol_loss(z, y, -5.0, 11.0).item() == pytest.approx(
        math.exp(5.0) - math.log(-math.expm1(-math.exp(-11.0))) + _gumbel_bce(0.5, 0), rel=1e-12
    )


def test_stable_form_equals_the_naive_one_and_stays_finite():
    # Where the naive form (Python floats, log of G and of 1 - G) is finite, the stable form
    # equals it: to 1e-9 where 1 - G keeps its digits, to 1e-4 for z in (10, 30], where the naive
    # 1 - G = 1 - exp(-e^-z) itself loses them (cancellation, ~1e-16 / e^-z).
    for zz in [-30.0, -8.0, -4.0, -1.0, 0.0, 0.5, 3.0, 10.0, 19.9, 20.1, 25.0, 30.0]:
        z = torch.tensor([[zz, 0.0, 0.0, 0.0]], dtype=torch.float64)
        for y in (1, 0):
            try:
                want = _gumbel_bce(zz, y)
            except ValueError:  # log(0): G(z) = exp(-e^-z) underflows to 0 below z ~ -6.6
                assert zz < -6.6 and y == 1
                continue
            label = 0 if y == 1 else 3
            rest = 2 * _gumbel_bce(0.0, 0)  # columns 1 and 2, negatives at z = 0
            got = gol_loss(z, torch.tensor([label]), **NO_CLAMP).item() - rest
            assert got == pytest.approx(want, rel=1e-9 if zz <= 10 else 1e-4), (zz, y)
    # float32: the naive form is inf from z ~ 17.4 (1 - G rounds to 0); the stable one is ~z.
    big = torch.tensor([[18.0, 50.0, 100.0, 0.0], [1000.0, 1e6, 30.0, 0.0]])
    naive = -torch.log(1 - gumbel_probs(big[:, :K]))
    assert torch.isinf(naive).all()
    per_roi = [gol_loss(big[i : i + 1], torch.tensor([3]), **NO_CLAMP).item() for i in range(2)]
    assert per_roi[0] == pytest.approx(18.0 + 50.0 + 100.0, rel=1e-6)
    assert per_roi[1] == pytest.approx(1000.0 + 1e6 + 30.0, rel=1e-6)
    # Very negative z: the negatives cost 0 exactly (G = 0); with the clamp the positives are
    # finite (exp(4)), without it exp(-z) overflows float32 (the reason the authors clamp).
    neg = torch.tensor([[-200.0, -1e4, -90.0, 0.0]], requires_grad=True)
    assert gol_loss(neg, torch.tensor([3]), **NO_CLAMP).item() == 0.0
    clamped = gol_loss(neg, torch.tensor([0]))
    assert clamped.item() == pytest.approx(math.exp(4.0), rel=1e-6)
    clamped.backward()
    assert torch.isfinite(neg.grad).all()


@pytest.mark.parametrize("clamp", [dict(), NO_CLAMP])
def test_gradient_is_the_analytic_derivative(clamp):
    zs = [-3.5, -1.0, 0.0, 0.7, 2.5, 6.0, 9.5]
    if clamp:  # past the expansion threshold of the stable form (20) too
        zs += [19.0, 21.0, 40.0]
    z = torch.tensor([[v, v, v, 0.0] for v in zs], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0] * len(zs))  # column 0 positive, columns 1 and 2 negative
    gol_loss(z, y, **clamp).backward()
    n = len(zs)
    for i, v in enumerate(zs):
        assert z.grad[i, 0].item() == pytest.approx(_dloss_dz(v, 1) / n, rel=1e-9, abs=1e-300)
        for j in (1, 2):
            assert z.grad[i, j].item() == pytest.approx(_dloss_dz(v, 0) / n, rel=1e-9)
        assert z.grad[i, K].item() == 0.0  # the background column is not trained


def test_grw_weights_each_roi_by_its_label():
    # DisAlign's stage two on GOL: sum_i w[y_i] sum_j BCE_G(z_ij, y_ij) / sum_i w[y_i].
    z, y = _zy()
    w = [2.0, 0.5, 1.5, 1.0]
    num = sum(
        w[Y[i]] * sum(_gumbel_bce(Z[i][j], 1.0 * (Y[i] == j)) for j in range(K)) for i in range(5)
    )
    den = sum(w[Y[i]] for i in range(5))
    got = gol_loss(z, y, weights=torch.tensor(w))
    assert got.item() == pytest.approx(num / den, rel=1e-12)
    assert gol_loss(z, y, weights=torch.ones(K + 1)).item() == pytest.approx(
        gol_loss(z, y).item(), rel=1e-14
    )


def test_empty_batch_and_bad_options():
    z = torch.zeros(0, K + 1, requires_grad=True)
    loss = gol_loss(z, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    with pytest.raises(ValueError, match="GOL.CLAMP_MIN < CLAMP_MAX"):
        StageOneLoss("gol", K, clamp_min=3.0, clamp_max=2.0)
    with pytest.raises(ValueError, match="STAGE_ONE_LOSS option init_bias must be a finite"):
        StageOneLoss("gol", K, init_bias=float("nan"))
    assert StageOneLoss("gol", K).state_dict() == {}  # no state
    assert StageOneLoss("gol", K).activation == "gumbel"


# ---- in the box predictor --------------------------------------------------------------------
def _predictor(**kw):
    torch.manual_seed(0)
    kw = dict(dict(calibrate=False), **kw)
    return DisAlignFastRCNNOutputLayers(
        ShapeSpec(channels=D),
        box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
        num_classes=K,
        stage_one_loss="gol",
        **kw,
    )


_proposals = one_image_proposals


def test_predictor_bias_init_activation_and_no_sigmoid_classifier():
    pred = _predictor()
    assert not pred.sigmoid_ce and pred.activation == "gumbel"
    # The authors' init: every class starts at G(-2) = exp(-e^2).
    assert torch.equal(pred.cls_score.bias, torch.full((K + 1,), -2.0))
    x = torch.zeros(2, D)
    (p,) = pred.predict_probs(pred(x), _proposals([3, 3]))
    assert p[0, 0].item() == pytest.approx(math.exp(-math.exp(2.0)), rel=1e-6)
    assert _predictor(stage_one_options=dict(init_bias=-3.0)).cls_score.bias.max().item() == -3.0
    # The cosine classifier has no bias: nothing to initialise.
    assert getattr(_predictor(cosine=True).cls_score, "bias", None) is None


def test_stage_two_trains_grw_through_the_gumbel():
    w = torch.tensor([3.0, 1.0, 0.5, 1.0])
    pred = _predictor(calibrate=True, cls_loss="grw", class_weights=w)
    x = torch.randn(5, D)
    scores, deltas = pred(x)
    with EventStorage():
        loss = pred.losses((scores, deltas), _proposals(Y))["loss_cls"]
    torch.testing.assert_close(loss, gol_loss(scores.float(), torch.tensor(Y), weights=w))


def test_fracal_on_gol_and_norcal_refused():
    freq = torch.tensor([0.5, 0.05, 0.002])
    dims = torch.tensor([1.8, 1.2, 1.0])
    pred = _predictor(posthoc="fracal", fracal_lambda=2.0)
    pred.fracal_freq.copy_(freq)
    pred.fracal_dims.copy_(dims)
    z, _ = _zy(torch.float32)
    (p,) = pred.predict_probs((z, None), _proposals([0] * 5))
    # p'_j = G(z_j) G(z_j + a_j + b_j), a_j = -log10(K f_j), b_j = -log10(K D_j^2 / sum D_k^2).
    d2 = [v**2 for v in dims.tolist()]
    for i in range(5):
        for j in range(K):
            a = -math.log10(K * freq[j].item())
            b = -math.log10(K * d2[j] / sum(d2))
            want = _g(Z[i][j]) * _g(Z[i][j] + a + b)
            assert p[i, j].item() == pytest.approx(want, rel=1e-5)
        assert p[i, K].item() == pytest.approx(_g(Z[i][K]), rel=1e-6)
    a, b = fracal_adjustments(freq, dims, 2.0)
    assert torch.isfinite(a + b).all()
    with pytest.raises(ValueError, match=r"MODEL\.DISALIGN\.POSTHOC='norcal'.*Gumbel"):
        _predictor(posthoc="norcal", class_counts=[5, 3, 1])


def test_config_key_and_lazyconfig(tiny_dataset):
    cfg = tiny_cfg("synthetic_lt/mask_rcnn_synth_gol.yaml")
    model = build_model(cfg)  # on detectron2 v0.6 too
    s1 = model.roi_heads.box_predictor.stage_one_loss
    assert s1.kind == "gol" and not model.roi_heads.box_predictor.sigmoid_ce
    assert (s1.options["clamp_min"], s1.options["clamp_max"]) == (-4.0, 10.0)
    cfg = add_disalign_config(get_cfg())
    cfg.merge_from_file(os.path.join(CONFIGS, "mask_rcnn_R_50_FPN_2x_gol.yaml"))
    h = cfg.MODEL.ROI_BOX_HEAD
    assert h.STAGE_ONE_LOSS == "gol" and not cfg.MODEL.DISALIGN.BOX_CALIBRATION
    assert (h.GOL.CLAMP_MIN, h.GOL.CLAMP_MAX, h.GOL.INIT_BIAS) == (-4.0, 10.0, -2.0)
    assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
    assert cfg.DATALOADER.REPEAT_THRESHOLD == 0.001 and cfg.SOLVER.MAX_ITER == 180000
    node = L(DisAlignFastRCNNOutputLayers)(
        input_shape=ShapeSpec(channels=D),
        box2box_transform=L(Box2BoxTransform)(weights=(10.0, 10.0, 5.0, 5.0)),
        num_classes=K,
        calibrate=False,
        cls_loss="ce",
        stage_one_loss="gol",
        stage_one_options=dict(clamp_min=-6.0, clamp_max=8.0, init_bias=-2.5),
    )
    pred = instantiate(node)
    assert pred.stage_one_loss.options["clamp_min"] == -6.0
    assert pred.cls_score.bias[0].item() == -2.5


@pytest.mark.skipif(not has_federated_loss(), reason="USE_SIGMOID_CE exists on detectron2 main")
def test_sigmoid_classifier_switched_on_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"STAGE_ONE_LOSS='gol' needs .*USE_SIGMOID_CE=False"):
        _predictor(use_sigmoid_ce=True)
