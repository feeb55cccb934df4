"""FRACAL (disalign_det/modeling/fracal.py, MODEL.DISALIGN.POSTHOC "fracal"): the box-counting
dimension and the adjusted probabilities against their formulas written out here, the statistics
from dataset dicts, and the box predictor storing them with the model (softmax and sigmoid)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, BoxMode, Instances

from disalign_det.compat.features import has_federated_loss
from disalign_det.modeling import DisAlignFastRCNNOutputLayers
from disalign_det.modeling.fracal import (
    box_counting_dimensions,
    fracal_sigmoid_probs,
    fracal_softmax_probs,
    fracal_statistics_from_dicts,
)
from disalign_det.modeling.freeze import is_disalign_state
from disalign_det.modeling.stage_one_losses import objectness_sigmoid_probs


def _slope(xs, ys):
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _dimension_by_hand(points, grid):
    """Box counting written out: occupied cells of the g x g grids with g^2 <= n, slope of
    log N_g against log g; 1 for fewer than 4 points or a slope below 1."""
    n = len(points)
    if n < 4:
        return 1.0
    xs, ys = [], []
    for g in range(1, grid + 1):
        if g * g > n:
            continue
        cells = {(min(int(x * g), g - 1), min(int(y * g), g - 1)) for x, y in points}
        xs.append(math.log(g))
        ys.append(math.log(len(cells)))
    return max(_slope(xs, ys), 1.0) if len(xs) > 1 else 1.0


def test_box_counting_against_the_definition():
    rng = np.random.default_rng(0)
    classes = [
        rng.uniform(0, 1, size=(40, 2)),  # spread out
        0.5 + 0.05 * rng.standard_normal(size=(30, 2)),  # clustered
        np.stack([np.linspace(0, 1, 25), np.linspace(0, 1, 25)], 1),  # a line
        rng.uniform(0, 1, size=(3, 2)),  # too few boxes
    ]
    centres = np.concatenate(classes).clip(0, 1)
    labels = np.concatenate([np.full(len(c), k) for k, c in enumerate(classes)])
    dims = box_counting_dimensions(centres, labels, num_classes=5, grid=8)
    for k, pts in enumerate(classes):
        want = _dimension_by_hand([tuple(p) for p in pts.clip(0, 1)], grid=8)
        assert dims[k].item() == pytest.approx(want, rel=1e-5), k
    assert dims[4].item() == 1.0  # no box at all
    assert dims[0] > dims[1]  # uniformly spread > clustered


def test_box_counting_of_a_filled_square_and_a_line():
    g = 16
    cells = (np.arange(g) + 0.5) / g
    square = np.stack(np.meshgrid(cells, cells), -1).reshape(-1, 2)
    line = np.stack([cells, cells], 1).repeat(16, 0)  # 256 points on 16 cells of the diagonal
    pts = np.concatenate([square, line])
    labels = np.array([0] * len(square) + [1] * len(line))
    dims = box_counting_dimensions(pts, labels, 2, grid=g)
    assert dims[0].item() == pytest.approx(2.0, abs=1e-6)
    assert dims[1].item() == pytest.approx(1.0, abs=1e-6)


Z = [[1.0, -0.5, 0.3, 0.2], [-1.2, 0.7, 2.0, -0.3], [0.1, 0.1, -1.0, 1.5]]
FREQ = [0.5, 0.05, 0.002]
DIMS = [1.9, 1.4, 1.0]
K = 3


def test_softmax_fracal_against_the_formula():
    lam = 2.0
    got = fracal_softmax_probs(
        torch.tensor(Z, dtype=torch.float64), torch.tensor(FREQ), torch.tensor(DIMS), lam
    )
    for i, z in enumerate(Z):
        # p_j ∝ exp(z_j - log10(K f_j)) / D_j ** lambda; background ∝ exp(z_bg).
        un = [math.exp(z[j] - math.log10(K * FREQ[j])) / DIMS[j] ** lam for j in range(K)]
        un.append(math.exp(z[K]))
        for j in range(K + 1):
            assert got[i, j].item() == pytest.approx(un[j] / sum(un), rel=1e-6)


def test_sigmoid_fracal_against_the_formula():
    lam = 2.0
    z = torch.tensor(Z, dtype=torch.float64)
    probs = objectness_sigmoid_probs(z)
    got = fracal_sigmoid_probs(probs, z, torch.tensor(FREQ), torch.tensor(DIMS), lam)
    total = sum(d**lam for d in DIMS)
    for i in range(len(Z)):
        for j in range(K):
            a = -math.log10(K * FREQ[j])
            b = -math.log10(K * DIMS[j] ** lam / total)
            want = probs[i, j].item() / (1 + math.exp(-(Z[i][j] + a + b)))
            assert got[i, j].item() == pytest.approx(want, rel=1e-6)
        assert got[i, K] == probs[i, K]


def test_uniform_statistics_and_lambda_zero_leave_the_softmax_unchanged():
    z = torch.tensor(Z, dtype=torch.float64)
    got = fracal_softmax_probs(z, torch.full((K,), 1.0 / K), torch.tensor(DIMS), 0.0)
    torch.testing.assert_close(got, F.softmax(z, dim=1).to(got))


def test_statistics_from_dataset_dicts():
    def ann(x, y, w, h, c):
        return {"bbox": [x, y, w, h], "bbox_mode": BoxMode.XYWH_ABS, "category_id": c}

    dicts = [
        {"width": 100, "height": 50, "annotations": [ann(0, 0, 10, 10, 0), ann(40, 20, 20, 10, 1)]},
        {"width": 200, "height": 200, "annotations": [ann(100, 100, 50, 50, 0)] * 2},
        {"width": 10, "height": 10, "annotations": []},
        {"width": 64, "height": 64, "annotations": [ann(0, 0, 64, 64, 0), ann(1, 1, 2, 2, 0)]},
    ]
    freq, dims = fracal_statistics_from_dicts(dicts, num_classes=3, grid=4)
    # Images containing the class / all images (a class in no image counts as one image).
    torch.testing.assert_close(freq, torch.tensor([3 / 4, 1 / 4, 1 / 4]))
    centres0 = [(0.05, 0.1), (0.625, 0.625), (0.625, 0.625), (0.5, 0.5), (2 / 64, 2 / 64)]
    assert dims[0].item() == pytest.approx(_dimension_by_hand(centres0, 4), rel=1e-5)
    assert dims[1].item() == 1.0 and dims[2].item() == 1.0


# ---- in the box predictor --------------------------------------------------------------------
D = 8


def _predictor(**kw):
    torch.manual_seed(0)
    return DisAlignFastRCNNOutputLayers(
        ShapeSpec(channels=D),
        box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
        num_classes=6,
        posthoc="fracal",
        **kw,
    )


def _proposals(n):
    inst = Instances((32, 32))
    inst.proposal_boxes = Boxes(torch.tensor([[1.0, 2.0, 20.0, 25.0]] * n))
    return [inst]


def test_predictor_computes_the_statistics_once_and_stores_them(tiny_dataset):
    pred = _predictor(fracal_fallback=("tiny_train",), fracal_grid=8, fracal_lambda=1.5)
    state = pred.state_dict()
    assert {"fracal_freq", "fracal_dims"} <= set(state)
    assert all(
        is_disalign_state(f"roi_heads.box_predictor.{k}") for k in ("fracal_freq", "fracal_dims")
    )
    x = torch.randn(5, D)
    scores, deltas = pred(x)
    (p,) = pred.predict_probs((scores, deltas), _proposals(5))
    freq, dims = fracal_statistics_from_dicts(DatasetCatalog.get("tiny_train"), 6, grid=8)
    assert torch.equal(pred.fracal_freq, freq) and torch.equal(pred.fracal_dims, dims)
    torch.testing.assert_close(p, fracal_softmax_probs(scores, freq, dims, 1.5))
    # A model loading these buffers (a checkpoint) does not read the training data again.
    other = _predictor(fracal_fallback=None, fracal_grid=8, fracal_lambda=1.5)
    other.load_state_dict(pred.state_dict())
    (q,) = other.predict_probs((scores, deltas), _proposals(5))
    assert torch.equal(p, q)
    with pytest.raises(ValueError, match="POSTHOC='fracal'.*DATASETS.TRAIN"):
        fresh = _predictor(fracal_fallback=None)
        fresh.predict_probs((scores, deltas), _proposals(5))


@pytest.mark.skipif(not has_federated_loss(), reason="this detectron2 (v0.6) has no sigmoid")
@pytest.mark.parametrize("stage_one_loss", ["ce", "eqlv2"])
def test_predictor_fracal_on_a_sigmoid_stage_one(stage_one_loss):
    pred = _predictor(use_sigmoid_ce=True, stage_one_loss=stage_one_loss)
    freq, dims = torch.linspace(0.01, 0.6, 6), torch.linspace(1.0, 2.0, 6)
    pred.fracal_freq.copy_(freq), pred.fracal_dims.copy_(dims)
    scores, deltas = pred(torch.randn(5, D))
    (p,) = pred.predict_probs((scores, deltas), _proposals(5))
    base = scores.sigmoid() if stage_one_loss == "ce" else objectness_sigmoid_probs(scores)
    torch.testing.assert_close(p, fracal_sigmoid_probs(base, scores, freq, dims, 2.0))
