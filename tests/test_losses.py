"""GRW weights and the weighted losses equal their formulas."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

import disalign_det  # noqa: F401
from disalign_det.modeling.losses import (
    grw_class_weights,
    weighted_cross_entropy,
    weighted_mask_bce,
)


def _reference_weights(counts, rho):
    total = sum(counts)
    raw = [(total / n) ** rho for n in counts]
    scale = len(counts) / sum(raw)
    return [w * scale for w in raw] + [1.0]


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.8, 1.0, 2.0])
def test_grw_weights_match_formula(rho):
    counts = [1000, 300, 40, 7, 1]
    w = grw_class_weights(counts, rho)
    assert w.shape == (6,) and w.dtype == torch.float32
    for got, want in zip(w.tolist(), _reference_weights(counts, rho)):
        assert got == pytest.approx(want, rel=1e-6)
    # Foreground weights average 1, background is exactly 1.
    assert w[:-1].sum().item() == pytest.approx(5.0, rel=1e-6)
    assert w[-1].item() == 1.0


def test_grw_rarer_classes_weigh_more():
    w = grw_class_weights([500, 50, 5], 0.8)
    assert w[0] < w[1] < w[2]
    # The ratio between two classes is (n_a / n_b) ** rho, independent of the others.
    assert (w[2] / w[0]).item() == pytest.approx(100.0**0.8, rel=1e-5)


def test_grw_rho_zero_is_plain_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(50, 6)
    labels = torch.randint(0, 6, (50,))
    w = grw_class_weights([100, 20, 3, 9, 1], 0.0)
    assert torch.equal(w, torch.ones(6))
    assert weighted_cross_entropy(logits, labels, w).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6
    )


def test_grw_zero_count_is_clamped_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="disalign_det.modeling.losses"):
        w = grw_class_weights([100, 0, 10], 0.8)
    assert torch.isfinite(w).all()
    assert "zero training samples" in caplog.text
    # The empty class is treated like the rarest observed class (count 10).
    assert w[1].item() == pytest.approx(w[2].item(), rel=1e-6)


@pytest.mark.parametrize("rho", [-0.1, float("nan"), float("inf"), "0.8", None, True])
def test_grw_rejects_bad_rho(rho):
    with pytest.raises(ValueError, match="MODEL.DISALIGN.RHO"):
        grw_class_weights([10, 5], rho)


def test_weighted_cross_entropy_equals_formula():
    torch.manual_seed(1)
    logits = torch.randn(40, 5)
    labels = torch.randint(0, 5, (40,))
    w = torch.tensor([0.5, 2.0, 1.5, 0.25, 1.0])
    ce = -F.log_softmax(logits, dim=1)[torch.arange(40), labels]
    want = (w[labels] * ce).sum() / w[labels].sum()
    got = weighted_cross_entropy(logits, labels, w)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_weighted_cross_entropy_empty_batch_is_zero_with_graph():
    logits = torch.zeros(0, 4, requires_grad=True)
    loss = weighted_cross_entropy(logits, torch.zeros(0, dtype=torch.long), torch.ones(4))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


def test_weighted_mask_bce_equals_formula():
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 4)
    gt = torch.rand(3, 4, 4) > 0.5
    w = torch.tensor([1.0, 3.0, 0.5])
    per_pixel = -(gt * F.logsigmoid(logits) + (~gt) * F.logsigmoid(-logits))
    per_roi = per_pixel.flatten(1).mean(1)
    want = (w * per_roi).sum() / w.sum()
    assert weighted_mask_bce(logits, gt, w).item() == pytest.approx(want.item(), rel=1e-6)
    # Unweighted: the stock Mask R-CNN loss (mean over every pixel).
    assert weighted_mask_bce(logits, gt).item() == pytest.approx(per_pixel.mean().item(), rel=1e-6)
    assert math.isfinite(weighted_mask_bce(logits[:0], gt[:0], w[:0]).item())
