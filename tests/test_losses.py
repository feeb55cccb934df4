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
    weighted_sigmoid_cross_entropy,
)

K = 4


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


# --------------------------------------------------------------------------------------------------
# Normalisation over the global batch (several processes)
# --------------------------------------------------------------------------------------------------


def _split_losses(fn, full_args, part_args):
    """``fn`` on the whole batch (one process) and the mean of ``fn`` on each part with the
    weight sums of all parts averaged (what N processes compute, DDP averaging their gradients)."""
    whole = fn(*full_args)
    sums = []
    for args in part_args:  # pass 1: the local weight sums (the all-reduce's inputs)
        fn(*args, normalize=lambda local: sums.append(local.detach()) or local)
    mean_sum = sum(sums) / len(sums)
    parts = [fn(*args, normalize=lambda local: mean_sum) for args in part_args]
    return whole, sum(parts) / len(parts)


def _cases():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, K + 1, generator=g)
    labels = torch.tensor([0, 0, 1, 3, 3, 3, K, K, 2, K])
    w = grw_class_weights([300, 40, 7, 2], 0.8)
    masks = torch.randn(7, 5, 5, generator=g)
    gt = torch.rand(7, 5, 5, generator=g) > 0.5
    mlabels = torch.tensor([0, 3, 3, 1, 2, 3, 0])
    splits = (slice(0, 3), slice(3, 10))  # unequal parts: per-part means would differ
    msplits = (slice(0, 1), slice(1, 7))
    cases = {}
    for weights in (None, w):
        cases[f"ce_{weights is not None}"] = (
            weighted_cross_entropy, (logits, labels, weights),
            [(logits[s], labels[s], weights) for s in splits])  # fmt: skip
        cases[f"sigmoid_{weights is not None}"] = (
            weighted_sigmoid_cross_entropy, (logits, labels, weights),
            [(logits[s], labels[s], weights) for s in splits])  # fmt: skip
        rw = None if weights is None else weights[mlabels]
        cases[f"mask_{weights is not None}"] = (
            weighted_mask_bce, (masks, gt, rw),
            [(masks[s], gt[s], None if rw is None else rw[s]) for s in msplits])  # fmt: skip
    return cases


@pytest.mark.parametrize("name", sorted(_cases()))
def test_global_normalisation_makes_the_loss_independent_of_the_split(name):
    fn, full, parts = _cases()[name]
    whole, split = _split_losses(fn, full, parts)
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=0)
    # Normalised per part (the local mean), the split changes the loss.
    local = sum(fn(*args) for args in parts) / len(parts)
    assert (local - whole).abs() > 1e-3 * whole.abs()
    # With the local sum as the normaliser, the result is the local weighted mean.
    for args in parts:
        torch.testing.assert_close(fn(*args, normalize=lambda s: s), fn(*args), rtol=1e-6, atol=0)


def test_empty_part_still_takes_part_in_the_all_reduce():
    calls = []
    for fn, args in (
        (weighted_cross_entropy, (torch.zeros(0, K + 1), torch.zeros(0, dtype=torch.long))),
        (weighted_sigmoid_cross_entropy, (torch.zeros(0, K + 1), torch.zeros(0, dtype=torch.long))),
        (weighted_mask_bce, (torch.zeros(0, 5, 5), torch.zeros(0, 5, 5))),
    ):
        loss = fn(*args, normalize=lambda s: calls.append(s) or s + 1)
        assert loss.item() == 0.0
    assert [c.item() for c in calls] == [0.0, 0.0, 0.0]
