"""Adaptive calibration equals the paper's formula; the cosine classifier is what it says."""

import pytest
import torch

import disalign_det  # noqa: F401
from disalign_det.modeling.calibration import CosineLinear, calibrate_logits


def test_calibration_equals_formula_on_random_parameters():
    torch.manual_seed(0)
    z = torch.randn(7, 5)
    conf = torch.randn(7, 1)
    beta = torch.rand(5) * 2
    gamma = torch.randn(5)
    s = torch.sigmoid(conf)
    want = s * (beta * z + gamma) + (1 - s) * z
    torch.testing.assert_close(calibrate_logits(z, conf, beta, gamma), want, rtol=1e-6, atol=1e-6)


def test_calibration_is_exact_identity_at_init():
    torch.manual_seed(1)
    z = torch.randn(11, 9) * 30
    conf = torch.randn(11, 1) * 5
    out = calibrate_logits(z, conf, torch.ones(9), torch.zeros(9))
    assert torch.equal(out, z)


def test_calibration_broadcasts_per_pixel():
    torch.manual_seed(2)
    m = torch.randn(3, 6, 6)
    conf = torch.randn(3, 6, 6)
    beta = torch.tensor([0.5, 2.0, 1.0])[:, None, None]
    gamma = torch.tensor([1.0, -1.0, 0.0])[:, None, None]
    s = torch.sigmoid(conf)
    want = s * (beta * m + gamma) + (1 - s) * m
    torch.testing.assert_close(calibrate_logits(m, conf, beta, gamma), want)


def test_cosine_linear():
    torch.manual_seed(3)
    layer = CosineLinear(8, 4, scale=20.0)
    assert layer.scale.item() == 20.0 and not hasattr(layer, "bias")
    x = torch.randn(5, 8)
    out = layer(x)
    cos = torch.nn.functional.cosine_similarity(x[:, None, :], layer.weight[None], dim=2)
    torch.testing.assert_close(out, 20.0 * cos, rtol=1e-5, atol=1e-5)
    # Invariant to the feature norm.
    torch.testing.assert_close(layer(3.0 * x), out, rtol=1e-5, atol=1e-5)
    assert out.abs().max().item() <= 20.0 + 1e-4
    out.sum().backward()
    assert layer.scale.grad is not None and layer.weight.grad is not None
    assert pytest.approx(20.0) == layer.scale.item()
