"""Stage-one losses EQLv2, Seesaw and ECM (disalign_det/modeling/stage_one_losses.py): each against
its paper's formulas written out here with Python floats on small hand-made inputs, the degenerate
settings that are the plain losses, their state buffers (saved, resumed, identical across two gloo
processes), their use in the box predictor and DisAlign's stage two on top of each (identity at
init, loading with only calibration keys missing). EQLv2 / ECM need detectron2 main's sigmoid
classifier: on v0.6 they fail naming the key."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from common import HAND_K as K
from common import HAND_LABELS as Y
from common import HAND_LOGITS as Z
from common import one_image_proposals
from conftest import CONFIGS, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.utils.events import EventStorage

from disalign_det import add_disalign_config
from disalign_det.compat.features import has_federated_loss
from disalign_det.engine import DisAlignCheckpointer, Trainer
from disalign_det.modeling import DisAlignFastRCNNOutputLayers, NormedLinear
from disalign_det.modeling.freeze import is_disalign_state
from disalign_det.modeling.stage_one_losses import (
    StageOneLoss,
    all_reduce_sum,
    ecm_loss,
    ecm_margins,
    eqlv2_gradient_statistics,
    eqlv2_loss,
    eqlv2_weights,
    gumbel_probs,
    objectness_sigmoid_probs,
    objectness_softmax_log_probs,
    seesaw_loss,
    seesaw_objectness_loss,
)

needs_sigmoid = pytest.mark.skipif(
    not has_federated_loss(), reason="this detectron2 (v0.6) has no sigmoid classifier"
)
LOSS_PARAMS = [
    pytest.param("eqlv2", marks=needs_sigmoid),
    "seesaw",
    pytest.param("ecm", marks=needs_sigmoid),
    "gol",  # its own (Gumbel) activation: on both detectron2s (tests/test_gol.py)
]
# Each loss's inference activation.
ACTIVATION = {
    "eqlv2": objectness_sigmoid_probs,
    "seesaw": lambda s: F.softmax(s, -1),
    "ecm": objectness_sigmoid_probs,
    "gol": gumbel_probs,
}

# 3 foreground classes + background; 5 RoIs, two of them background (tests/common.py).


def _zy():
    return torch.tensor(Z, dtype=torch.float64), torch.tensor(Y)


def _bce(z, y):
    # -[y log sigma(z) + (1 - y) log(1 - sigma(z))]
    s = 1 / (1 + math.exp(-z))
    return -(y * math.log(s) + (1 - y) * math.log(1 - s))


# ---- EQLv2 -----------------------------------------------------------------------------------
def test_eqlv2_weights_are_the_papers_mapping():
    pos, neg = [3.0, 1.0, 0.0], [3.0, 2.0, 5.0]
    gamma, mu, alpha = 12.0, 0.8, 4.0
    r, q = eqlv2_weights(torch.tensor(pos), torch.tensor(neg), gamma, mu, alpha)
    for j in range(3):
        g = pos[j] / (neg[j] + 1e-10)
        q_j = 1 / (1 + math.exp(-gamma * (g - mu)))
        assert q[j].item() == pytest.approx(q_j, rel=1e-6)
        assert r[j].item() == pytest.approx(1 + alpha * (1 - q_j), rel=1e-6)
    # Balanced gradients (g = 1 > mu) keep negatives nearly fully; a class without positive
    # gradient has its negatives suppressed and its positives up-weighted to ~1 + alpha.
    assert q[0] > 0.9 and q[2] < 1e-4 and r[2] > 4.99


def test_eqlv2_loss_against_the_formula():
    z, y = _zy()
    r, q = torch.tensor([1.5, 4.0, 2.0]), torch.tensor([0.9, 0.1, 0.5])
    want = 0.0
    for i in range(5):
        for j in range(K + 1):
            t = 1.0 if Y[i] == j else 0.0
            w = 1.0 if j == K else (r[j].item() if t else q[j].item())  # background column: 1
            want += w * _bce(Z[i][j], t)
    want /= 5
    assert eqlv2_loss(z, y, r, q).item() == pytest.approx(want, rel=1e-9)


def test_eqlv2_with_unit_weights_is_sigmoid_bce():
    z, y = _zy()
    ones = torch.ones(K, dtype=torch.float64)
    target = F.one_hot(y, K + 1).double()
    want = F.binary_cross_entropy_with_logits(z, target, reduction="sum") / len(Y)
    torch.testing.assert_close(eqlv2_loss(z, y, ones, ones), want, rtol=1e-12, atol=0)


def test_eqlv2_statistics_are_the_weighted_loss_gradients():
    # The accumulated "gradients" are |d(R * loss) / dz_ij| split by positive / negative targets.
    z, y = _zy()
    z.requires_grad_(True)
    r, q = torch.tensor([1.5, 4.0, 2.0]), torch.tensor([0.9, 0.1, 0.5])
    (eqlv2_loss(z, y, r, q) * len(Y)).backward()
    target = F.one_hot(y, K + 1).double()
    grad = z.grad.abs()
    pos, neg = eqlv2_gradient_statistics(z.detach(), y, r, q)
    torch.testing.assert_close(pos, (grad * target).sum(0)[:K])
    torch.testing.assert_close(neg, (grad * (1 - target)).sum(0)[:K])


def test_eqlv2_state_starts_neutral_accumulates_and_resumes():
    z, y = _zy()
    z = z.float()  # the module computes in float32
    m = StageOneLoss("eqlv2", K).train()
    ones = torch.ones(K)
    # No gradient statistics yet: every weight is 1 (the plain sigmoid loss).
    torch.testing.assert_close(m(z, y), eqlv2_loss(z, y, ones, ones))
    pos1, neg1 = eqlv2_gradient_statistics(z, y, ones, ones)
    torch.testing.assert_close(m.pos_grad, pos1.double())
    torch.testing.assert_close(m.neg_grad, neg1.double())
    r, q = eqlv2_weights(pos1, neg1, 12.0, 0.8, 4.0)
    torch.testing.assert_close(m(z, y), eqlv2_loss(z, y, r, q).float(), check_dtype=False)
    pos2, neg2 = eqlv2_gradient_statistics(z, y, r.float(), q.float())
    torch.testing.assert_close(m.pos_grad, (pos1 + pos2).double())
    # Saved in the state dict; a fresh module loading it continues identically.
    state = m.state_dict()
    assert set(state) == {"pos_grad", "neg_grad"}
    resumed = StageOneLoss("eqlv2", K).train()
    resumed.load_state_dict(state)
    assert torch.equal(resumed(z, y), m(z, y))
    assert torch.equal(resumed.pos_grad, m.pos_grad) and torch.equal(resumed.neg_grad, m.neg_grad)
    # Inference / evaluation does not change the statistics.
    before = m.pos_grad.clone()
    m.eval()(z, y)
    assert torch.equal(m.pos_grad, before)


# ---- Seesaw ----------------------------------------------------------------------------------
def _seesaw_denominator(e, s, yi, counts, p, q, eps):
    """e^z_i + sum_{j != i} S_ij e^z_j over the classes of ``e`` (exp logits) for a RoI of class
    i = ``yi``, S_ij = M_ij C_ij: M = (N_j / N_i)^p if N_j < N_i, C = (s_j / s_i)^q if s_j > s_i
    (s the softmax, s_i clamped to >= eps)."""
    denom = e[yi]
    for j in range(len(e)):
        if j == yi:
            continue
        S = 1.0
        n_i, n_j = max(counts[yi], 1), max(counts[j], 1)
        if n_j < n_i:
            S *= (n_j / n_i) ** p
        own = max(s[yi], eps)
        if s[j] > own:
            S *= (s[j] / own) ** q
        denom += S * e[j]
    return denom


def _seesaw_by_hand(counts, p, q, eps):
    """The paper's sigma_hat_i = e^z_i / (sum_{j != i} S_ij e^z_j + e^z_i), S = M C among the
    foreground classes (1 for the background logit; background RoIs: plain softmax)."""
    total = 0.0
    for i in range(5):
        zi, yi = Z[i], Y[i]
        e = [math.exp(v) for v in zi]
        s = [v / sum(e) for v in e]  # softmax, for the compensation factor
        if yi < K:  # the background logit (j = K) gets no factor (S = 1)
            denom = _seesaw_denominator(e[:K], s[:K], yi, counts, p, q, eps) + e[K]
        else:  # a background RoI: plain softmax
            denom = sum(e)
        total += -math.log(e[yi] / denom)
    return total / 5


@pytest.mark.parametrize("p,q", [(0.8, 2.0), (0.8, 0.0), (0.0, 2.0), (1.5, 1.0)])
def test_seesaw_against_the_formula(p, q):
    z, y = _zy()
    counts = [400.0, 3.0, 50.0]
    got = seesaw_loss(z, y, torch.tensor(counts), p, q, eps=1e-2)
    assert got.item() == pytest.approx(_seesaw_by_hand(counts, p, q, 1e-2), rel=1e-9)


def test_seesaw_with_p_q_zero_is_softmax_cross_entropy():
    z, y = _zy()
    got = seesaw_loss(z, y, torch.tensor([400.0, 3.0, 50.0]), 0.0, 0.0)
    assert torch.equal(got, F.cross_entropy(z, y))


def test_seesaw_compensation_is_not_differentiated():
    # The compensation factor uses detached probabilities: the gradient of the rare RoI's
    # loss is the one of cross-entropy on the adjusted (constant-shifted) logits.
    z, y = _zy()
    z.requires_grad_(True)
    counts = torch.tensor([400.0, 3.0, 50.0])
    seesaw_loss(z, y, counts, 0.8, 2.0).backward()
    with torch.no_grad():
        shift = torch.zeros_like(z)
        z0 = z.detach().clone().requires_grad_(True)
    # Recover the shift from the loss's own adjusted logits: loss(z0 + shift) with shift fixed.
    for i, (row, label) in enumerate(zip(Z, Y)):
        e = [math.exp(v) for v in row]
        s = [v / sum(e) for v in e]
        for j in range(K):
            if label < K and j != label:
                n_i, n_j = max(counts[label].item(), 1), max(counts[j].item(), 1)
                m = (n_j / n_i) ** 0.8 if n_j < n_i else 1.0
                c = (s[j] / max(s[label], 1e-2)) ** 2 if s[j] > max(s[label], 1e-2) else 1.0
                shift[i, j] = math.log(m * c)
    F.cross_entropy(z0 + shift, y).backward()
    torch.testing.assert_close(z.grad, z0.grad)


def test_seesaw_counts_accumulate_before_the_loss_and_resume():
    z, y = _zy()
    z = z.float()  # the module computes in float32
    m = StageOneLoss("seesaw", K, p=0.8, q=2.0).train()
    got = m(z, y)
    want_counts = torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    assert torch.equal(m.cum_samples, want_counts)
    torch.testing.assert_close(got, seesaw_loss(z, y, want_counts[:K].float(), 0.8, 2.0))
    m(z, y)
    assert torch.equal(m.cum_samples, 2 * want_counts)
    resumed = StageOneLoss("seesaw", K).train()
    resumed.load_state_dict(m.state_dict())
    assert torch.equal(resumed(z, y), m(z, y)) and torch.equal(resumed.cum_samples, m.cum_samples)


# ---- Seesaw's objectness branch (mmdetection's K + 2 outputs) ----------------------------------
# K class logits c, then the objectness logits (o_fg, o_bg); labels Y (two background RoIs).
ZO = [
    [1.0, -0.5, 0.3, 0.8, -0.2],
    [-1.2, 0.7, 2.0, -0.3, 0.4],
    [0.1, 0.1, -1.0, -0.6, 1.5],
    [0.4, -2.0, 0.9, 1.1, 0.0],
    [2.2, 0.3, -0.7, 0.5, 0.9],
]


def _softmax(v):
    e = [math.exp(a) for a in v]
    return [a / sum(e) for a in e]


def test_objectness_log_probs_are_mmdetections_activation():
    # p_j = softmax(c)_j softmax(o)_fg for the K classes, p_bg = softmax(o)_bg.
    lp = objectness_softmax_log_probs(torch.tensor(ZO, dtype=torch.float64))
    assert lp.shape == (5, K + 1) and lp.dtype == torch.float64
    for i, row in enumerate(ZO):
        pc, po = _softmax(row[:K]), _softmax(row[K:])
        want = [pc[j] * po[0] for j in range(K)] + [po[1]]
        for j in range(K + 1):
            assert math.exp(lp[i, j].item()) == pytest.approx(want[j], rel=1e-12)


def _seesaw_objectness_by_hand(counts, p, q, eps):
    """mmdetection's SeesawLoss: for a foreground RoI of class i, CE of e^c_i / (e^c_i +
    sum_{j != i} S_ij e^c_j) over the K class logits; every RoI: CE of softmax(o) against fg (0)
    / bg (1); both summed and divided by R."""
    total = 0.0
    for row, yi in zip(ZO, Y):
        c, o = row[:K], row[K:]
        if yi < K:
            e, s = [math.exp(v) for v in c], _softmax(c)
            total += -math.log(e[yi] / _seesaw_denominator(e, s, yi, counts, p, q, eps))
        total += -math.log(_softmax(o)[0 if yi < K else 1])
    return total / len(ZO)


@pytest.mark.parametrize("p,q", [(0.8, 2.0), (0.8, 0.0), (0.0, 2.0), (1.5, 1.0)])
def test_seesaw_objectness_against_the_formula(p, q):
    raw, y = torch.tensor(ZO, dtype=torch.float64), torch.tensor(Y)
    counts = [400.0, 3.0, 50.0]
    got = seesaw_objectness_loss(objectness_softmax_log_probs(raw), y, torch.tensor(counts), p, q)
    assert got.item() == pytest.approx(_seesaw_objectness_by_hand(counts, p, q, 1e-2), rel=1e-9)


def test_seesaw_objectness_with_p_q_zero_is_the_two_cross_entropies():
    # Value and gradient w.r.t. the raw K + 2 logits: the class CE on the foreground RoIs plus
    # the objectness CE on all, both / R (the log-probabilities lose nothing).
    raw = torch.tensor(ZO, dtype=torch.float64, requires_grad=True)
    raw0 = raw.detach().clone().requires_grad_(True)
    y = torch.tensor(Y)
    fg = y < K
    got = seesaw_objectness_loss(objectness_softmax_log_probs(raw), y, torch.ones(K), 0.0, 0.0)
    want = (
        F.cross_entropy(raw0[fg, :K], y[fg], reduction="sum")
        + F.cross_entropy(raw0[:, K:], (~fg).long(), reduction="sum")
    ) / len(Y)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    got.backward()
    want.backward()
    torch.testing.assert_close(raw.grad, raw0.grad, rtol=1e-10, atol=1e-12)


def test_seesaw_objectness_module_counts_and_loss():
    raw, y = torch.tensor(ZO), torch.tensor(Y)
    m = StageOneLoss("seesaw", K, objectness=True).train()
    assert m.num_logits == K + 2 and StageOneLoss("seesaw", K).num_logits == K + 1
    lp = objectness_softmax_log_probs(raw)
    got = m(lp, y)
    counts = torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64)  # all labels, bg included
    assert torch.equal(m.cum_samples, counts)
    torch.testing.assert_close(got, seesaw_objectness_loss(lp, y, counts[:K].float(), 0.8, 2.0))
    with pytest.raises(ValueError, match=r"MODEL\.ROI_BOX_HEAD\.SEESAW\.OBJECTNESS"):
        StageOneLoss("eqlv2", K, objectness=True)


# ---- ECM -------------------------------------------------------------------------------------
def test_ecm_margins_and_weights_against_the_formula():
    counts, ratio = [100.0, 10.0, 1.0], 2.0
    m_pos, m_neg, w = ecm_margins(torch.tensor(counts), ratio)
    n = counts + [sum(counts) * ratio]
    total = sum(n)
    for j in range(K + 1):
        n_pos, n_neg = n[j], total - n[j]
        root = n_pos**0.25 + n_neg**0.25
        assert m_pos[j].item() == pytest.approx(math.log(root / n_neg**0.25), rel=1e-6)
        assert m_neg[j].item() == pytest.approx(math.log(root / n_pos**0.25), rel=1e-6)
        a = n_neg / n_pos
        assert w[j].item() == pytest.approx(a * math.log((1 + a) / a), rel=1e-6)
    # Rarer classes: a larger negative margin, a smaller positive one.
    assert m_neg[2] > m_neg[1] > m_neg[0] and m_pos[2] < m_pos[1] < m_pos[0]


def test_ecm_loss_against_the_formula():
    z, y = _zy()
    counts = torch.tensor([100.0, 10.0, 1.0])
    m_pos, m_neg, w = ecm_margins(counts, 6.3313)
    want = 0.0
    for i in range(5):
        for j in range(K + 1):
            e_pos = math.exp(Z[i][j] + m_pos[j].item())
            e_neg = math.exp(-Z[i][j] + m_neg[j].item())
            p_pos = e_pos / (e_pos + e_neg)
            term = -math.log(p_pos) if Y[i] == j else -math.log(1 - p_pos)
            want += w[j].item() * term
    want /= 5
    assert ecm_loss(z, y, m_pos, m_neg, w).item() == pytest.approx(want, rel=1e-6)


def test_ecm_with_balanced_classes_has_no_margin_shift():
    # n_j = N - n_j: m+ = m- = log 2 (the margins cancel) and w = log 2: ECM is then the
    # sigmoid BCE of 2z, weighted by log 2.
    z = torch.randn(4, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    m_pos, m_neg, w = ecm_margins(torch.tensor([5.0]), fg_bg_ratio=1.0)
    torch.testing.assert_close(m_pos, m_neg)
    target = F.one_hot(y, 2).double()
    want = math.log(2) * F.binary_cross_entropy_with_logits(2 * z, target, reduction="sum") / 4
    torch.testing.assert_close(ecm_loss(z, y, m_pos, m_neg, w), want)


def test_ecm_needs_its_class_frequencies():
    z, y = _zy()
    m = StageOneLoss("ecm", K)
    with pytest.raises(RuntimeError, match="STAGE_ONE_LOSS='ecm'.*never installed"):
        m(z, y)
    m.set_class_frequencies([100, 10, 1])
    assert "sample_counts" in m.state_dict() and torch.isfinite(m(z, y))


def test_objectness_activation():
    z, _ = _zy()
    p = objectness_sigmoid_probs(z)
    for i in range(5):
        bg = 1 / (1 + math.exp(-Z[i][K]))
        for j in range(K):
            assert p[i, j].item() == pytest.approx((1 - bg) / (1 + math.exp(-Z[i][j])), rel=1e-9)
        assert p[i, K].item() == pytest.approx(bg, rel=1e-9)


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match="MODEL.ROI_BOX_HEAD.STAGE_ONE_LOSS"):
        StageOneLoss("focal", K)
    with pytest.raises(ValueError, match="STAGE_ONE_LOSS option p"):
        StageOneLoss("seesaw", K, p=-1.0)


# ---- two processes ---------------------------------------------------------------------------
def _worker(rank, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    z, y = _zy()
    half = slice(0, 3) if rank == 0 else slice(3, 5)  # different RoIs in each process
    states = {}
    for kind in ("eqlv2", "seesaw"):
        m = StageOneLoss(kind, K).train()
        for _ in range(2):
            m(z[half], y[half])
        states[kind] = {k: v.clone() for k, v in m.state_dict().items()}
    states["sum"] = all_reduce_sum(torch.tensor([float(rank + 1)]))
    torch.save(states, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_state_is_all_reduced_identically_across_two_processes(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["sum"].item() == r1["sum"].item() == 3.0
    z, y = _zy()
    for kind in ("eqlv2", "seesaw"):
        for key in r0[kind]:
            assert torch.equal(r0[kind][key], r1[kind][key]), (kind, key)
    # Seesaw: the counts of the whole batch, twice.
    want = 2 * torch.bincount(y, minlength=K + 1).double()
    assert torch.equal(r0["seesaw"]["cum_samples"], want)
    # EQLv2: the first update is the one process sees on the whole batch (weights 1 then).
    ones = torch.ones(K)
    pos1, neg1 = eqlv2_gradient_statistics(z.float(), y, ones, ones)
    assert (r0["eqlv2"]["pos_grad"] > pos1.double() - 1e-6).all()
    assert (r0["eqlv2"]["neg_grad"] > neg1.double()).all()


# ---- in the box predictor --------------------------------------------------------------------
D = 8
BOX2BOX = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))


def _predictor(kind, **kw):
    torch.manual_seed(0)
    sigmoid = dict(use_sigmoid_ce=True) if kind in ("eqlv2", "ecm") else {}
    kw = dict(dict(calibrate=False), **kw)
    return DisAlignFastRCNNOutputLayers(
        ShapeSpec(channels=D),
        box2box_transform=BOX2BOX,
        num_classes=K,
        stage_one_loss=kind,
        **sigmoid,
        **kw,
    )


_proposals = one_image_proposals


def _load_and_predict(stage_one, stage_two):
    """Load ``stage_one``'s state into ``stage_two`` (only DisAlign tensors may be missing), give
    the confidence s(x) a non-trivial weight, and predict a random batch with both: (p1, p2, x,
    proposals)."""
    incompatible = stage_two.load_state_dict(stage_one.state_dict(), strict=False)
    assert not incompatible.unexpected_keys
    assert incompatible.missing_keys and all(map(is_disalign_state, incompatible.missing_keys))
    with torch.no_grad():
        stage_two.confidence_layer.weight.normal_(std=1.0)
    x, proposals = torch.randn(7, D) * 3, _proposals([0] * 7)
    (p1,), (p2,) = (m.predict_probs(m(x), proposals) for m in (stage_one, stage_two))
    return p1, p2, x, proposals


@pytest.mark.parametrize("kind", LOSS_PARAMS)
def test_predictor_trains_with_the_stage_one_loss_and_predicts_its_activation(kind):
    pred = _predictor(kind)
    if kind == "ecm":
        pred.set_class_frequencies([50, 5, 1])
    assert pred.needs_class_frequencies == (kind == "ecm")
    x = torch.randn(5, D)
    proposals = _proposals(Y)
    scores, deltas = pred(x)
    reference = StageOneLoss(kind, K)
    reference.load_state_dict(pred.stage_one_loss.state_dict())
    with EventStorage():
        loss = pred.losses((scores, deltas), proposals)["loss_cls"]
    torch.testing.assert_close(loss, reference.train()(scores, torch.tensor(Y)))
    (probs,) = pred.predict_probs((scores, None), proposals)
    assert torch.equal(probs, ACTIVATION[kind](scores))
    assert all(k.startswith("stage_one_loss.") for k in pred.state_dict() if "grad" in k)


@pytest.mark.parametrize("kind", LOSS_PARAMS)
def test_calibration_is_the_identity_at_init_on_each_stage_one(kind):
    # Stage two at init (beta = 1, gamma = 0, any s(x)) predicts what the stage one predicts, with
    # the activation of its loss; the stage one's state dict loads with only calibration missing.
    stage_one = _predictor(kind)
    stage_two = _predictor(kind, calibrate=True, cls_loss="grw", class_weights=torch.ones(K + 1))
    incompatible = stage_two.load_state_dict(stage_one.state_dict(), strict=False)
    assert not incompatible.unexpected_keys
    assert incompatible.missing_keys and all(map(is_disalign_state, incompatible.missing_keys))
    with torch.no_grad():
        stage_two.confidence_layer.weight.normal_(std=1.0)  # s(x) far from 0.5: still identity
    x, proposals = torch.randn(7, D) * 3, _proposals([0] * 7)
    (p1,), (p2,) = (m.predict_probs(m(x), proposals) for m in (stage_one, stage_two))
    assert torch.equal(p1, p2)
    assert torch.equal(p1, ACTIVATION[kind](stage_one(x)[0]))


@pytest.mark.skipif(has_federated_loss(), reason="detectron2 main has the sigmoid classifier")
@pytest.mark.parametrize("kind", ["eqlv2", "ecm"])
def test_sigmoid_losses_fail_clearly_on_v06(kind):
    cfg = tiny_cfg(opts=["MODEL.ROI_BOX_HEAD.STAGE_ONE_LOSS", kind])
    with pytest.raises(ValueError, match=rf"MODEL\.ROI_BOX_HEAD\.STAGE_ONE_LOSS='{kind}'.*v0\.6"):
        DisAlignFastRCNNOutputLayers(cfg, ShapeSpec(channels=D))


# ---- Seesaw's normalised linear classifier (mmdetection's NormedLinear) ----------------------
def test_normed_linear_against_the_formula():
    # z_j = tau <x / (|x| + eps), w_j / (|w_j| + eps)> + b_j, tau = 20 fixed, eps = 1e-6.
    layer = NormedLinear(3, 2, scale=20.0).double()
    W, B = [[0.5, -1.0, 2.0], [0.0, 3.0, 4.0]], [0.25, -0.75]
    X = [[1.0, 2.0, 2.0], [-3.0, 0.0, 4.0]]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(W, dtype=torch.float64))
        layer.bias.copy_(torch.tensor(B, dtype=torch.float64))
    z = layer(torch.tensor(X, dtype=torch.float64))
    for r, x in enumerate(X):
        nx = math.sqrt(sum(v * v for v in x)) + 1e-6
        for j, w in enumerate(W):
            nw = math.sqrt(sum(v * v for v in w)) + 1e-6
            want = 20.0 * sum(a / nx * b / nw for a, b in zip(x, w)) + B[j]
            assert z[r, j].item() == pytest.approx(want, rel=1e-12)
    # e.g. row 0, class 1: 20 * (0 + 6 + 8) / (3 * 5) - 0.75 (up to eps).
    assert z[0, 1].item() == pytest.approx(20 * 14 / 15 - 0.75, rel=1e-6)
    # tau is a constant (not learned, not in the state dict); the stock names weight / bias.
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]


def test_normed_linear_init_is_mmdetections():
    torch.manual_seed(0)
    layer = NormedLinear(256, 300)
    assert torch.equal(layer.bias, torch.zeros(300))
    assert layer.weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_predictor_with_normed_linear_keeps_the_stock_names():
    pred = _predictor("seesaw", cosine=True, normed_linear=True)
    assert isinstance(pred.cls_score, NormedLinear) and pred.cls_score.scale == 20.0
    assert {k for k in pred.state_dict() if k.startswith("cls_score.")} == {
        "cls_score.weight",
        "cls_score.bias",
    }
    x = torch.randn(4, D)
    w, b = pred.cls_score.weight, pred.cls_score.bias
    # |w_j| ~ 0.03 at init, so mmdetection's eps = 1e-6 on the norms shows at 1e-5.
    unit = lambda v: v / (v.norm(dim=1, keepdim=True) + 1e-6)  # noqa: E731
    want = 20.0 * unit(x) @ unit(w).T + b
    torch.testing.assert_close(pred(x)[0], want, rtol=1e-5, atol=1e-5)
    # The default cosine classifier is unchanged: learned tau, no bias.
    cos = _predictor("seesaw", cosine=True)
    assert {k for k in cos.state_dict() if k.startswith("cls_score.")} == {
        "cls_score.weight",
        "cls_score.scale",
    }
    with pytest.raises(ValueError, match=r"MODEL\.ROI_BOX_HEAD\.NORMED_LINEAR.*COSINE_CLASSIFIER"):
        _predictor("seesaw", normed_linear=True)


def test_calibration_is_the_identity_at_init_on_the_normed_linear_seesaw():
    stage_one = _predictor("seesaw", cosine=True, normed_linear=True)
    with torch.no_grad():  # a trained bias (non-zero) must load and be kept
        stage_one.cls_score.bias.copy_(torch.tensor([0.5, -1.0, 0.25, 2.0]))
    stage_two = _predictor(
        "seesaw",
        cosine=True,
        normed_linear=True,
        calibrate=True,
        cls_loss="grw",
        class_weights=torch.ones(K + 1),
    )
    p1, p2, x, proposals = _load_and_predict(stage_one, stage_two)
    assert torch.equal(p1, p2)
    assert torch.equal(p1, F.softmax(stage_one(x)[0], -1))


@pytest.mark.parametrize(
    "classifier",
    [dict(), dict(cosine=True), dict(cosine=True, normed_linear=True)],
    ids=["linear", "cosine", "normed_linear"],
)
def test_predictor_with_the_objectness_branch(classifier):
    pred = _predictor("seesaw", stage_one_options=dict(objectness=True), **classifier)
    assert pred.cls_score.weight.shape == (K + 2, D)
    x, proposals = torch.randn(6, D), _proposals([0, 1, 2, 3, 3, 1])
    raw = pred.cls_score(x)
    scores, deltas = pred(x)
    torch.testing.assert_close(scores, objectness_softmax_log_probs(raw))
    (probs,) = pred.predict_probs((scores, None), proposals)
    pc, po = F.softmax(raw[:, :K], 1), F.softmax(raw[:, K:], 1)
    torch.testing.assert_close(probs, torch.cat([pc * po[:, :1], po[:, 1:]], 1))
    with EventStorage():
        loss = pred.losses((scores, deltas), proposals)["loss_cls"]
    reference = StageOneLoss("seesaw", K, objectness=True).eval()  # eval: the counts stay
    reference.load_state_dict(pred.stage_one_loss.state_dict())
    assert torch.equal(reference.cum_samples, torch.tensor([1.0, 2.0, 1.0, 2.0]).double())
    torch.testing.assert_close(loss, reference(scores, torch.tensor([0, 1, 2, 3, 3, 1])))
    with pytest.raises(ValueError, match=r"SEESAW\.OBJECTNESS needs .*STAGE_ONE_LOSS='seesaw'"):
        _predictor("ce", stage_one_options=dict(objectness=True))


def test_calibration_acts_only_on_the_class_logits_of_the_objectness_model():
    opts = dict(stage_one_options=dict(objectness=True), cosine=True, normed_linear=True)
    stage_one = _predictor("seesaw", **opts)
    with torch.no_grad():
        stage_one.cls_score.bias.copy_(torch.tensor([0.5, -1.0, 0.25, 1.0, -0.5]))
    stage_two = _predictor(
        "seesaw", calibrate=True, cls_loss="grw", class_weights=torch.ones(K + 1), **opts
    )
    p1, p2, x, proposals = _load_and_predict(stage_one, stage_two)
    assert torch.equal(p1, p2)  # identity at init
    # A trained calibration: the class logits c' = c + s ((beta - 1) c + gamma); the objectness
    # (hence p_bg) is untouched.
    with torch.no_grad():
        stage_two.logit_scale.copy_(torch.tensor([1.5, 0.5, 2.0]))
        stage_two.logit_bias.copy_(torch.tensor([0.3, -0.2, 1.0]))
    (p3,) = stage_two.predict_probs(stage_two(x), proposals)
    raw = stage_one.cls_score(x)
    s = torch.sigmoid(stage_two.confidence_layer(x))
    c = raw[:, :K] + s * ((stage_two.logit_scale - 1) * raw[:, :K] + stage_two.logit_bias)
    po = F.softmax(raw[:, K:], 1)
    torch.testing.assert_close(p3, torch.cat([F.softmax(c, 1) * po[:, :1], po[:, 1:]], 1))
    torch.testing.assert_close(p3[:, K], p1[:, K])


def test_posthoc_adjustments_on_the_objectness_model():
    # NorCal acts on the K + 1 probabilities p (foreground divided by the relative counts,
    # renormalised); tau-norm re-normalises only the K class rows of a linear classifier.
    counts = torch.tensor([50.0, 5.0, 1.0])
    x, proposals = torch.randn(5, D), _proposals([0] * 5)
    norcal = _predictor(
        "seesaw", stage_one_options=dict(objectness=True), posthoc="norcal", class_counts=counts
    )
    raw = norcal.cls_score(x)
    pc, po = F.softmax(raw[:, :K], 1), F.softmax(raw[:, K:], 1)
    p = torch.cat([pc * po[:, :1], po[:, 1:]], 1)
    adj = torch.cat([p[:, :K] / (counts / counts.mean()), p[:, K:]], 1)
    (got,) = norcal.eval().predict_probs(norcal(x), proposals)
    torch.testing.assert_close(got, adj / adj.sum(1, keepdim=True))

    tau = _predictor("seesaw", stage_one_options=dict(objectness=True), posthoc="tau_norm").eval()
    with torch.no_grad():
        tau.cls_score.weight.mul_(torch.arange(1.0, K + 3)[:, None])
    w, b = tau.cls_score.weight, tau.cls_score.bias
    norms = w[:K].norm(dim=1, keepdim=True)
    w_adj = torch.cat([w[:K] * norms.mean() / norms, w[K:]])
    torch.testing.assert_close(tau(x)[0], objectness_softmax_log_probs(x @ w_adj.T + b))


def test_seesaw_configs_use_the_normed_linear_classifier(tiny_dataset):
    # The LVIS recipe, its DisAlign delta and the synthetic configs that mirror their classifier.
    for name in (
        "mask_rcnn_R_50_FPN_2x_seesaw.yaml",
        "disalign_mask_rcnn_seesaw.yaml",
        "synthetic_lt/mask_rcnn_synth_seesaw.yaml",
        "synthetic_lt/disalign_synth_seesaw.yaml",
        "synthetic_lt/disalign_box_only_synth_seesaw.yaml",
    ):
        cfg = get_cfg()
        add_disalign_config(cfg)
        cfg.merge_from_file(os.path.join(CONFIGS, name))
        box = cfg.MODEL.ROI_BOX_HEAD
        assert box.STAGE_ONE_LOSS == "seesaw", name
        assert (box.COSINE_CLASSIFIER, box.NORMED_LINEAR, box.COSINE_SCALE) == (True, True, 20.0)
        # The LVIS recipe has mmdetection's objectness branch; the benchmark's configs do not.
        assert box.SEESAW.OBJECTNESS is ("synthetic" not in name), name
    model = build_model(tiny_cfg("synthetic_lt/mask_rcnn_synth_seesaw.yaml"))
    assert isinstance(model.roi_heads.box_predictor.cls_score, NormedLinear)


# ---- ECM's recipe: normed linear classifier, gradient clipping of the whole model ---------------
def _clipped_step(clip_type):
    # Two parameter tensors with gradients (6, 0) and (8,): norms 6 and 8, together 10.
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.merge_from_list(["SOLVER.BASE_LR", 1.0, "SOLVER.MOMENTUM", 0.0, "SOLVER.WEIGHT_DECAY", 0.0])
    clip = cfg.SOLVER.CLIP_GRADIENTS
    clip.ENABLED, clip.CLIP_VALUE, clip.CLIP_TYPE = True, 5.0, clip_type
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    model.b = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    optimizer = Trainer.build_optimizer(cfg, model)
    model.a.grad = torch.tensor([6.0, 0.0], dtype=torch.float64)
    model.b.grad = torch.tensor([8.0], dtype=torch.float64)
    optimizer.step()  # SGD, lr 1: parameter = -clipped gradient
    return -model.a.detach(), -model.b.detach()


def test_full_model_gradient_clipping_clips_the_norm_of_all_gradients():
    # clip_grad_norm_ scales every gradient by max_norm / (total_norm + 1e-6) when that is < 1.
    a, b = _clipped_step("full_model")
    coef = 5.0 / (10.0 + 1e-6)
    assert a.tolist() == pytest.approx([6.0 * coef, 0.0], rel=1e-12)
    assert b.tolist() == pytest.approx([8.0 * coef], rel=1e-12)
    assert (a.square().sum() + b.square().sum()).sqrt().item() == pytest.approx(5.0, rel=1e-6)
    # detectron2's "norm": each parameter's gradient on its own (so the total stays above 5).
    a, b = _clipped_step("norm")
    assert a.tolist() == pytest.approx([6.0 * 5.0 / (6.0 + 1e-6), 0.0], rel=1e-12)
    assert b.tolist() == pytest.approx([8.0 * 5.0 / (8.0 + 1e-6)], rel=1e-12)


def test_ecm_recipe_is_the_authors():
    for name in ("mask_rcnn_R_50_FPN_1x_ecm.yaml", "disalign_mask_rcnn_ecm.yaml"):
        cfg = get_cfg()
        add_disalign_config(cfg)
        cfg.merge_from_file(os.path.join(CONFIGS, name))
        box = cfg.MODEL.ROI_BOX_HEAD
        assert (box.COSINE_CLASSIFIER, box.NORMED_LINEAR, box.COSINE_SCALE) == (True, True, 20.0)
    clip = cfg.clone()
    clip.merge_from_file(os.path.join(CONFIGS, "mask_rcnn_R_50_FPN_1x_ecm.yaml"))
    c = clip.SOLVER.CLIP_GRADIENTS
    assert (c.ENABLED, c.CLIP_TYPE, c.CLIP_VALUE, c.NORM_TYPE) == (True, "full_model", 5.0, 2.0)


# ---- DisAlign on top of each stage one (tiny model from the synthetic_lt configs) ---------------
OBJECTNESS = ["MODEL.ROI_BOX_HEAD.SEESAW.OBJECTNESS", "True"]


@pytest.mark.slow  # trains a tiny stage one
@pytest.mark.parametrize(
    "kind, opts",
    [
        pytest.param("eqlv2", [], marks=needs_sigmoid),
        ("seesaw", []),
        pytest.param("ecm", [], marks=needs_sigmoid),
        ("seesaw", OBJECTNESS),
        ("gol", []),
    ],
    ids=["eqlv2", "seesaw", "ecm", "seesaw_objectness", "gol"],
)
def test_disalign_on_each_stage_one_loads_and_starts_from_its_predictions(
    kind, opts, tiny_dataset, tmp_path
):
    from test_sigmoid import max_score_difference

    out = str(tmp_path)
    cfg1 = tiny_cfg(f"synthetic_lt/mask_rcnn_synth_{kind}.yaml", out, opts)
    trainer = Trainer(cfg1)  # installs ECM's class frequencies
    trainer.resume_or_load(resume=False)
    trainer.train()  # 3 iterations: the loss state moves
    s1 = trainer.model.roi_heads.box_predictor.stage_one_loss
    state = {k: v.clone() for k, v in s1.state_dict().items()}
    assert any(bool((v != 0).any()) for v in state.values()) or kind == "gol"  # GOL: no state
    with torch.no_grad():  # sharpen the classifier so that the tiny model detects something
        trainer.model.roi_heads.box_predictor.cls_score.weight.normal_(std=0.5)
    DetectionCheckpointer(trainer.model, out).save("stage1")
    path = os.path.join(out, "stage1.pth")

    cfg2 = tiny_cfg(f"synthetic_lt/disalign_synth_{kind}.yaml", out, ["MODEL.WEIGHTS", path] + opts)
    model2 = Trainer.build_model(cfg2)
    logits = model2.roi_heads.box_predictor.cls_score.weight.shape[0]
    assert logits == cfg2.MODEL.ROI_HEADS.NUM_CLASSES + (2 if opts else 1)
    # Raises if anything but the calibration (DisAlign state) is missing from the checkpoint.
    DisAlignCheckpointer(model2, strict_stage_one=True).load(path)
    ckpt = torch.load(path, weights_only=False)["model"]
    absent = [k for k in model2.state_dict() if k not in ckpt]
    assert absent and all(is_disalign_state(k) for k in absent), absent
    loaded = model2.roi_heads.box_predictor.stage_one_loss.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v)

    total, worst = max_score_difference(path, cfg1.clone(), cfg2)
    assert total > 0, "the stage-one model must predict something for this test to mean anything"
    assert worst <= 1e-6


def test_stage_one_configs_build_the_loss_they_name(tiny_dataset):
    cfg = tiny_cfg("synthetic_lt/mask_rcnn_synth_seesaw.yaml")
    model = build_model(cfg)
    pred = model.roi_heads.box_predictor
    assert pred.stage_one_loss.kind == "seesaw" and not pred.sigmoid_ce
    assert pred.stage_one_loss.options["p"] == 0.8 and pred.stage_one_loss.options["q"] == 2.0


# ---- the long-tail benchmark's stage-one axis -------------------------------------------------
def test_benchmark_plan_has_every_loss_and_fracal(tmp_path):
    from lab import longtail, plan

    preset = plan.Preset("t", seeds=(0,), stage_one_iters=10, stage_two_iters=4)
    losses = ["eqlv2", "seesaw", "ecm"]
    chains = plan.build_plan(preset, str(tmp_path), losses)
    methods = {c[0].stage_one: [r.method for r in c] for c in chains}
    # NorCal renormalises a softmax: not on the sigmoid stage ones; tau-norm not on the cosine
    # classifiers (Seesaw and ECM use it); FRACAL on every stage one, at the paper's lambda.
    common = ["stage_one", "disalign_box_only", "disalign_box_mask"]
    assert methods == {
        "eqlv2": common + ["tau_norm_1", "fracal_2"],
        "seesaw": common + ["norcal_1", "fracal_2"],
        "ecm": common + ["fracal_2"],
    }
    for chain in chains:
        first = chain[0]
        assert first.config.endswith(f"mask_rcnn_synth_{first.stage_one}.yaml")
        assert os.path.isfile(first.config)
        for run in chain[1:]:
            assert os.path.isfile(run.config)
            if run.method == "fracal_2":
                opts = run.opts
                assert opts[opts.index("MODEL.DISALIGN.POSTHOC") + 1] == "fracal"
                assert opts[opts.index("MODEL.DISALIGN.FRACAL_LAMBDA") + 1] == "2.0"
    rows = plan.method_rows(losses, preset.posthoc_powers)
    assert [m for g, m, _ in rows if g == "ecm"] == methods["ecm"]
    want = [s for s in plan.STAGE_ONES if has_federated_loss() or s not in ("eqlv2", "ecm")]
    assert longtail._available_stage_ones() == want
    assert set(plan.STAGE_ONES) == {"softmax", "rfs", "cosine", "eqlv2", "seesaw", "ecm", "gol"}
    gol = plan.build_plan(preset, str(tmp_path), ["gol"])
    assert [r.method for r in gol[0]] == common + ["tau_norm_1", "fracal_2"]  # no NorCal


def test_lazyconfig_arguments():
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate

    node = L(DisAlignFastRCNNOutputLayers)(
        input_shape=ShapeSpec(channels=D),
        box2box_transform=L(Box2BoxTransform)(weights=(10.0, 10.0, 5.0, 5.0)),
        num_classes=K,
        calibrate=False,
        cls_loss="ce",
        stage_one_loss="seesaw",
        stage_one_options=dict(p=0.5, q=1.0),
        cosine=True,
        normed_linear=True,
    )
    pred = instantiate(node)
    assert pred.stage_one_loss.kind == "seesaw" and isinstance(pred.cls_score, NormedLinear)
    assert pred.stage_one_loss.options["p"] == 0.5 and pred.stage_one_loss.options["q"] == 1.0
    node.stage_one_options = dict(objectness=True)
    assert instantiate(node).cls_score.weight.shape == (K + 2, D)
    node.stage_one_options = dict(p=0.5, q=1.0)
    if has_federated_loss():  # the sigmoid losses need the sigmoid classifier switched on
        node.stage_one_loss = "eqlv2"
        with pytest.raises(ValueError, match="STAGE_ONE_LOSS='eqlv2' needs .*USE_SIGMOID_CE=True"):
            instantiate(node)
        node.use_sigmoid_ce = True
        assert instantiate(node).stage_one_loss.uses_sigmoid


def test_empty_batches_give_a_connected_zero():
    z = torch.zeros(0, K + 1, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    ones = torch.ones(K)
    m_pos, m_neg, w = ecm_margins(torch.tensor([5.0, 2.0, 1.0]), 6.3313)
    for loss in (
        eqlv2_loss(z, y, ones, ones),
        seesaw_loss(z, y, ones, 0.8, 2.0),
        ecm_loss(z, y, m_pos, m_neg, w),
    ):
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()


@pytest.mark.slow  # trains and evaluates a tiny model per run
def test_longtail_smoke_on_the_loss_stage_ones(tiny_dataset, tmp_path):
    from common import tiny_opts

    from lab import longtail, plan
    from lab.run import InProcessRunner

    opts = tuple(tiny_opts(("tiny_val",), dets_per_image=20, lvis_format=tiny_dataset))
    preset = plan.Preset("smoke", seeds=(0,), stage_one_iters=3, stage_two_iters=2,
                         extra_opts=opts)  # fmt: skip
    stage_ones = ("seesaw", "eqlv2") if has_federated_loss() else ("seesaw",)
    res = longtail.run_benchmark(
        preset,
        str(tmp_path),
        stage_ones=stage_ones,
        jobs=1,
        runner=InProcessRunner(threads=1),
        log=lambda m: None,
        fixed_ap_k=4,
    )
    runs = {r.key: r for r in res["runs"]}
    for g in stage_ones:
        for method in ("stage_one", "disalign_box_mask", "fracal_2"):
            run = runs[f"seed0/{g}/{method}"]
            assert run.status == "done", (run.key, run.error)
            assert set(run.metrics) >= {"bbox", "segm"}
    rows = {(r["stage_one"], r["method"]) for r in res["rows"]}
    assert ("seesaw", "fracal_2") in rows and ("seesaw", "norcal_1") in rows
