"""The C++ CPU kernel of the segmentation loss's backward (disalign_det/csrc/): the interpolation
taps by hand, the kernel against the PyTorch ops and autograd, its input checks, the switch and
the fallback where it cannot be built (fast tier; the build itself is cached, see
disalign_det/modeling/cpu_kernel.py)."""

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from disalign_det.modeling import cpu_kernel
from disalign_det.modeling.losses import upsampled_cross_entropy
from disalign_det.modeling.upsample_adjoint import bilinear_upsample_adjoint, interpolation_taps


@pytest.fixture(scope="module")
def kernel():
    """The built kernel. It must build where there is a C++ compiler and ninja (CI has both);
    without them the test is skipped, and the loss uses the PyTorch ops (tested below)."""
    from torch.utils.cpp_extension import is_ninja_available

    module = cpu_kernel.load_cpu_kernel()
    if module is None:
        if shutil.which("c++") and is_ninja_available() and cpu_kernel.enabled():
            pytest.fail("the CPU kernel did not build although c++ and ninja are installed")
        pytest.skip("no C++ compiler / ninja here, or DISALIGN_CPU_KERNEL=0")
    return module


def test_interpolation_taps_by_hand():
    """Upsampling 3 -> 12 (factor 4, align_corners=False): output o samples input position
    (o + 0.5) / 4 - 0.5, clamped to [0, 2]; o = 0, 1 read input 0 only, o = 2 reads 0 and 1 with
    7/8 and 1/8, o = 5 with 1/8 and 7/8, o = 10, 11 read input 2 only. A factor of 1.5 (4 -> 6):
    the same rule at (o + 0.5) / 1.5 - 0.5, and every row's weights sum to 1."""
    taps, weights = interpolation_taps(3, 12, 4.0)
    assert taps.dtype == torch.int64 and weights.dtype == torch.float32
    assert taps.shape == weights.shape == (12, 2)
    expected = {0: [(0, 1.0)], 1: [(0, 1.0)], 2: [(0, 0.875), (1, 0.125)],
                5: [(0, 0.125), (1, 0.875)], 6: [(1, 0.875), (2, 0.125)],
                10: [(2, 1.0)], 11: [(2, 1.0)]}  # fmt: skip
    for o, pairs in expected.items():
        got = [(int(k), float(a)) for k, a in zip(taps[o], weights[o]) if a != 0]
        assert got == pairs, o
    taps, weights = interpolation_taps(4, 6, 1.5)
    for o in range(6):
        src = min(max((o + 0.5) / 1.5 - 0.5, 0.0), 3.0)
        k0 = int(src)
        lam = src - k0
        got = {int(k): float(a) for k, a in zip(taps[o], weights[o]) if a != 0}
        want = {k0: 1 - lam, min(k0 + 1, 3): lam} if lam else {k0: 1.0}
        assert got == pytest.approx(want, abs=1e-6), o
    torch.testing.assert_close(weights.sum(1), torch.ones(6))


def _case(n, c, h, w, factor, seed):
    """Softmax of upsampled random logits, labels with ignored pixels (scale 0) and GRW-like
    per-pixel scales, as the loss's backward sees them."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, c, h, w, generator=g)
    up = F.interpolate(logits, scale_factor=factor, mode="bilinear", align_corners=False)
    prob = torch.softmax(up.permute(0, 2, 3, 1), dim=-1).contiguous()
    labels = torch.randint(0, c, prob.shape[:3], generator=g)
    scale = (torch.rand(c, generator=g) + 0.5)[labels] / labels.numel()
    scale[0, : prob.shape[1] // 3] = 0.0  # ignored rows (their labels may be anything valid)
    return logits, prob, labels, scale


@pytest.mark.parametrize(
    "n, c, h, w, factor",
    [(2, 7, 6, 5, 4), (3, 5, 4, 7, 2), (1, 4, 3, 3, 3), (2, 6, 5, 4, 8), (2, 3, 4, 6, 1.5),
     (1, 5, 1, 2, 4), (1, 70, 4, 5, 4)],
)  # fmt: skip
def test_kernel_equals_pytorch_ops_and_autograd(kernel, n, c, h, w, factor):
    """The kernel's gradient against the PyTorch path (in-place one-hot, then the adjoint of
    :mod:`upsample_adjoint`) and against autograd through F.interpolate; integer and non-integer
    factors, a 1-pixel-high input; with two threads (images split between them, or for one image
    of 70 classes its channels in blocks of 48 and 22) bit for bit what one thread computes."""
    logits, prob, labels, scale = _case(n, c, h, w, factor, seed=n * 100 + c)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(cpu_kernel.upsampled_ce_grad(prob, labels, scale, (h, w), factor))
    finally:
        torch.set_num_threads(threads)
    out = outs[0]
    assert torch.equal(outs[1], out)
    assert out.shape == (n, c, h, w) and out.is_contiguous()
    target = prob.clone()
    target.scatter_add_(-1, labels.unsqueeze(-1), -torch.ones_like(prob[..., :1]))
    target *= scale.unsqueeze(-1)
    ops = bilinear_upsample_adjoint(target.clone(), (h, w), factor, dims=(1, 2))
    torch.testing.assert_close(out, ops.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-9)
    x = logits.clone().requires_grad_()
    up = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    (up * target.permute(0, 3, 1, 2)).sum().backward()
    torch.testing.assert_close(out, x.grad, rtol=1e-5, atol=1e-9)
    assert out.abs().max() > 0


def test_loss_backward_uses_the_kernel_and_the_switch_turns_it_off(kernel, monkeypatch):
    """On the CPU, upsampled_cross_entropy's backward goes through the kernel; with
    DISALIGN_CPU_KERNEL=0 through the PyTorch ops; the two gradients agree to float rounding."""
    calls = []
    real = cpu_kernel.upsampled_ce_grad

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr("disalign_det.modeling.losses.upsampled_ce_grad", spy)
    torch.manual_seed(3)
    logits = torch.randn(2, 6, 5, 4)
    labels = torch.randint(0, 6, (2, 20, 16))
    labels[1, :5] = 255
    weights = torch.rand(6) + 0.5
    grads = []
    for switch in ("1", "0"):
        monkeypatch.setenv(cpu_kernel.ENV_VAR, switch)
        x = logits.clone().requires_grad_()
        upsampled_cross_entropy(x, labels, 4, weights, None, 255).backward()
        grads.append(x.grad)
    assert calls == [True, False]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-9)


def test_kernel_rejects_bad_input(kernel):
    """Out-of-range labels or taps and wrong dtypes raise, naming the argument."""
    _, prob, labels, scale = _case(1, 4, 3, 3, 4, seed=0)
    taps = interpolation_taps(3, 12, 4.0)
    bad = labels.clone()
    bad[0, 0, 0] = 4
    with pytest.raises(RuntimeError, match=r"labels out of \[0, C\)"):
        kernel.upsampled_ce_grad(prob, bad, scale, *taps, *taps, 3, 3)
    with pytest.raises(RuntimeError, match="prob has dtype"):
        kernel.upsampled_ce_grad(prob.double(), labels, scale, *taps, *taps, 3, 3)
    with pytest.raises(RuntimeError, match=r"row_taps out of \[0, h\)"):
        kernel.upsampled_ce_grad(prob, labels, scale, *taps, *taps, 2, 3)
    with pytest.raises(RuntimeError, match="scale must be"):
        kernel.upsampled_ce_grad(prob, labels, scale[:, :5], *taps, *taps, 3, 3)
    # Not the kernel's case: float64 (or a CUDA tensor) goes to the PyTorch ops.
    assert cpu_kernel.upsampled_ce_grad(prob.double(), labels, scale, (3, 3), 4) is None


def test_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    """A build that fails (no compiler, say) leaves None and one warning that names the switch;
    the loss then trains through the PyTorch ops, with autograd's gradient."""
    import torch.utils.cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    cpu_kernel.load_cpu_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_kernel.__name__):
            assert cpu_kernel.load_cpu_kernel() is None
            assert cpu_kernel.load_cpu_kernel() is None  # cached: tried once
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "Ninja is required" in warnings[0].getMessage()
        assert cpu_kernel.ENV_VAR in warnings[0].getMessage()
        _, prob, labels, scale = _case(1, 4, 3, 3, 4, seed=1)
        assert cpu_kernel.upsampled_ce_grad(prob, labels, scale, (3, 3), 4) is None
        torch.manual_seed(4)
        x = torch.randn(1, 4, 3, 3, requires_grad=True)
        labels = torch.randint(0, 4, (1, 12, 12))
        upsampled_cross_entropy(x, labels, 4).backward()
        y = x.detach().clone().requires_grad_()
        up = F.interpolate(y, scale_factor=4, mode="bilinear", align_corners=False)
        F.cross_entropy(up, labels).backward()
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-9)
    finally:
        cpu_kernel.load_cpu_kernel.cache_clear()  # the next user loads the real (cached) build
