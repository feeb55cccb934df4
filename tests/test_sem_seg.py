"""DisAlign for semantic segmentation: heads, calibration maths, pixel GRW, freezing, pixel counts
and the long-tail evaluator (fast tier)."""

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from common import REPO
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from PIL import Image

from disalign_det import add_disalign_config
from disalign_det.data.sem_seg_counts import (
    count_label_pixels,
    pixel_counts,
    pixel_counts_from_cfg,
    read_pixel_ratios,
)
from disalign_det.evaluation.sem_seg_evaluation import (
    ADE20K_GROUPS,
    LongTailSemSegEvaluator,
    frequency_groups,
    iou_and_accuracy,
)
from disalign_det.modeling import apply_freeze
from disalign_det.modeling.losses import upsampled_cross_entropy, weighted_cross_entropy
from disalign_det.modeling.sem_seg import (
    CalibratedConv2d,
    DisAlignDeepLabV3Head,
    DisAlignDeepLabV3PlusHead,
    deeplab_project,
)
from disalign_det.modeling.upsample_adjoint import (
    _adjoint_kernel,
    _linear_interpolation,
    bilinear_upsample_adjoint,
)

NUM_CLASSES = 7
IGNORE = 255


def _cfg(head="DisAlignSemSegFPNHead", **disalign):
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.NAME = head
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = IGNORE
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "cross_entropy"
    cfg.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS = 32  # DeepLabV3Head: = CONVS_DIM
    cfg.MODEL.SEM_SEG_HEAD.ASPP_DILATIONS = [1, 2, 3]
    cfg.INPUT.CROP.ENABLED = False
    for k, v in disalign.items():
        setattr(cfg.MODEL.DISALIGN, k, v)
    return cfg


def _features(head):
    torch.manual_seed(0)
    shapes = {
        "DisAlignSemSegFPNHead": {"p2": (4, 16), "p3": (8, 16)},
        "SemSegFPNHead": {"p2": (4, 16), "p3": (8, 16)},
        "DisAlignDeepLabV3PlusHead": {"res2": (4, 16), "res5": (8, 32)},
        "DeepLabV3PlusHead": {"res2": (4, 16), "res5": (8, 32)},
        "DisAlignDeepLabV3Head": {"res5": (4, 32)},
        "DeepLabV3Head": {"res5": (4, 32)},
    }[head]
    input_shape = {k: ShapeSpec(channels=c, stride=s) for k, (s, c) in shapes.items()}
    feats = {k: torch.randn(2, c, 32 // s, 32 // s) for k, (s, c) in shapes.items()}
    return input_shape, feats


def _build_head(name, cfg):
    from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

    input_shape, feats = _features(name)
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = list(input_shape)
    if "DeepLab" in name:
        cfg.MODEL.SEM_SEG_HEAD.NORM = "BN"
    if "V3Plus" in name:
        cfg.MODEL.SEM_SEG_HEAD.PROJECT_FEATURES = ["res2"]
        cfg.MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS = [8]
    return SEM_SEG_HEADS_REGISTRY.get(name)(cfg, input_shape), feats


HEADS = [
    ("DisAlignSemSegFPNHead", "SemSegFPNHead"),
    ("DisAlignDeepLabV3PlusHead", "DeepLabV3PlusHead"),
    ("DisAlignDeepLabV3Head", "DeepLabV3Head"),
]


@pytest.mark.parametrize("name,stock", HEADS)
def test_identity_at_init(name, stock):
    """A stock head's weights loaded into the DisAlign head: same logits (1e-6) and argmax; only
    the calibration keys are missing."""
    cfg = _cfg(name)
    stock_head, feats = _build_head(stock, _cfg(name))
    head, _ = _build_head(name, cfg)
    incompatible = head.load_state_dict(stock_head.state_dict(), strict=False)
    assert sorted(incompatible.missing_keys) == [
        "predictor.confidence_layer.bias",
        "predictor.confidence_layer.weight",
        "predictor.logit_bias",
        "predictor.logit_scale",
    ]
    assert not incompatible.unexpected_keys
    # A random, non-zero confidence: the identity must not depend on s(p).
    torch.nn.init.normal_(head.predictor.confidence_layer.weight, std=1.0)
    stock_head.eval()
    head.eval()
    with torch.no_grad():
        ref, _ = stock_head(feats)
        out, _ = head(feats)
    assert out.shape == ref.shape == (2, NUM_CLASSES, 32, 32)
    assert (out - ref).abs().max().item() <= 1e-6
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_calibration_formula_on_nchw():
    """z'_c(p) = s(p) (beta_c z_c(p) + gamma_c) + (1 - s(p)) z_c(p), at the logit resolution."""
    torch.manual_seed(1)
    conv = CalibratedConv2d(5, 3, init_std=0.5)
    with torch.no_grad():
        conv.logit_scale.copy_(torch.tensor([0.5, 2.0, 1.5]))
        conv.logit_bias.copy_(torch.tensor([0.3, -1.0, 0.0]))
    x = torch.randn(2, 5, 4, 6)
    out = conv(x)
    z = torch.einsum("ndhw,cd->nchw", x, conv.weight[:, :, 0, 0]) + conv.bias.view(1, 3, 1, 1)
    w_s = conv.confidence_layer.weight[0, :, 0, 0]
    s = torch.sigmoid(torch.einsum("ndhw,d->nhw", x, w_s) + conv.confidence_layer.bias)[:, None]
    beta = conv.logit_scale.view(1, 3, 1, 1)
    gamma = conv.logit_bias.view(1, 3, 1, 1)
    expected = s * (beta * z + gamma) + (1 - s) * z
    assert out.shape == (2, 3, 4, 6)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _loss_inputs():
    torch.manual_seed(2)
    logits = torch.randn(2, NUM_CLASSES, 8, 8, requires_grad=True)
    targets = torch.randint(0, NUM_CLASSES, (2, 32, 32))
    targets[0, :5] = IGNORE
    return logits, targets


def test_grw_rho_zero_equals_stock_loss():
    cfg = _cfg(SEM_SEG_LOSS="grw", RHO=0.0)
    head, _ = _build_head("DisAlignSemSegFPNHead", cfg)
    stock, _ = _build_head("SemSegFPNHead", _cfg())
    head.set_class_frequencies(torch.arange(1, NUM_CLASSES + 1) * 100)
    assert torch.equal(head.pixel_class_weights(), torch.ones(NUM_CLASSES))
    logits, targets = _loss_inputs()
    ours = head.losses(logits, targets)["loss_sem_seg"]
    ref = stock.losses(logits, targets)["loss_sem_seg"]
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


def test_grw_pixel_weights_and_loss():
    """w_c = (1 / r_c) ** rho scaled to mean 1; loss = sum_p w[y_p] CE_p / sum_p w[y_p] over the
    non-ignored pixels of the upsampled logits."""
    rho = 0.2
    counts = torch.tensor([5000.0, 3000, 800, 100, 50, 10, 1])
    cfg = _cfg(SEM_SEG_LOSS="grw", RHO=rho)
    head, _ = _build_head("DisAlignSemSegFPNHead", cfg)
    head.set_class_frequencies(counts)
    r = counts / counts.sum()
    w = (1 / r) ** rho
    w = w / w.mean()
    torch.testing.assert_close(head.pixel_class_weights(), w, rtol=1e-6, atol=1e-6)
    logits, targets = _loss_inputs()
    up = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
    logp = torch.log_softmax(up, dim=1)
    valid = targets != IGNORE
    y = targets.clamp(max=NUM_CLASSES - 1)
    ce = -logp.gather(1, y[:, None])[:, 0]
    pw = w[y] * valid
    expected = (pw * ce).sum() / pw.sum()
    loss = head.losses(logits, targets)["loss_sem_seg"]
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


# ---- the GRW loss's own backward (speed; same maths) -------------------------------------------


def _stock_upsampled_ce(logits, labels, scale, weights, normalize, ignore):
    up = F.interpolate(logits, scale_factor=scale, mode="bilinear", align_corners=False)
    return weighted_cross_entropy(up, labels, weights, normalize, ignore)


def test_linear_interpolation_band_by_hand():
    """The adjoint's band for factor 4 (align_corners=False): output o = 4k + r samples the input
    at k + (r + 0.5) / 4 - 0.5, so k gets 1 - |d_r| and k -+ 1 gets |d_r|, d_r = -3/8, -1/8, 1/8,
    3/8; at the borders (sample clamped to the edge) the edge input gets weight 1."""
    a, (center, left, right, _, _) = _linear_interpolation(5, 20, 4.0)
    assert a.shape == (20, 5)
    torch.testing.assert_close(center[2], torch.tensor([0.625, 0.875, 0.875, 0.625]))
    torch.testing.assert_close(left[2], torch.tensor([0.375, 0.125, 0.0, 0.0]))
    torch.testing.assert_close(right[2], torch.tensor([0.0, 0.0, 0.125, 0.375]))
    torch.testing.assert_close(center[0], torch.tensor([1.0, 1.0, 0.875, 0.625]))
    torch.testing.assert_close(center[4], torch.tensor([0.625, 0.875, 1.0, 1.0]))
    x = torch.randn(3, 5)
    up = F.interpolate(x[None], scale_factor=4, mode="linear", align_corners=False)[0]
    torch.testing.assert_close(x @ a.t(), up, rtol=0, atol=1e-6)


def test_adjoint_kernel_by_hand():
    """Factor 4: input k receives outputs 4k - 2 .. 4k + 5 with weights (1, 3, 5, 7, 7, 5, 3, 1) / 8
    (the band above, its zero taps dropped: padding 2); input 0 also gets 3/8 of output 0 and 1/8
    of output 1 (weight 1 in all from those clamped samples), input n - 1 the mirror image."""
    kernel, first, last, padding = _adjoint_kernel(5, 20, 4.0)
    torch.testing.assert_close(kernel, torch.tensor([1.0, 3, 5, 7, 7, 5, 3, 1]) / 8)
    assert padding == 2
    assert first == ((0, 0.375), (1, 0.125)) and last == ((18, 0.125), (19, 0.375))
    assert _adjoint_kernel(2, 8, 4.0) is None  # no interior input: the banded path
    assert _adjoint_kernel(4, 6, 1.5) is None  # not an integer factor: the dense path


@pytest.mark.parametrize(
    "scale,size",
    [(4, (5, 7)), (2, (5, 7)), (3, (5, 7)), (8, (5, 7)), (4, (2, 7)), (3, (7, 2)), (1.5, (5, 7))],
)
def test_bilinear_upsample_adjoint_equals_autograd(scale, size):
    """bilinear_upsample_adjoint(g) = d/dx <F.interpolate(x), g>, for both layouts, with the row
    scale, in place or not: the strided convolution (integer factors, both sides >= 3), the
    banded multiply-adds (a side of 2) and the dense matmul (1.5)."""
    torch.manual_seed(4)
    h, w = size
    big_h, big_w = int(h * scale), int(w * scale)
    x = torch.randn(2, 3, h, w, requires_grad=True)
    g = torch.randn(2, 3, big_h, big_w)
    rows = torch.rand(2, 1, big_h, big_w)
    up = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    (ref,) = torch.autograd.grad(up, x, g * rows)
    nchw = bilinear_upsample_adjoint(g, (h, w), scale, row_scale=rows)
    torch.testing.assert_close(nchw, ref, rtol=1e-5, atol=1e-5)
    g_nhwc = g.permute(0, 2, 3, 1).contiguous()
    kept = g_nhwc.clone()
    for overwrite in (False, True):
        nhwc = bilinear_upsample_adjoint(
            g_nhwc, (h, w), scale, (1, 2), rows.permute(0, 2, 3, 1), overwrite=overwrite
        )
        torch.testing.assert_close(nhwc.permute(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-5)
        if not overwrite:
            assert torch.equal(g_nhwc, kept)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("cpu_kernel", ["1", "0"])
def test_upsampled_cross_entropy_equals_autograd(weighted, normalized, cpu_kernel, monkeypatch):
    """Loss of F.interpolate + weighted_cross_entropy (1e-6), gradient equal to autograd's of that
    composition, with ignored pixels; no_grad gives the same loss; a second backward
    (retain_graph) the same gradient. The backward by the C++ CPU kernel (where built) and by the
    PyTorch ops (DISALIGN_CPU_KERNEL=0)."""
    monkeypatch.setenv("DISALIGN_CPU_KERNEL", cpu_kernel)
    torch.manual_seed(5)
    logits = (3 * torch.randn(2, NUM_CLASSES, 6, 5)).requires_grad_()
    labels = torch.randint(0, NUM_CLASSES, (2, 24, 20))
    labels[0, :7] = IGNORE
    weights = torch.rand(NUM_CLASSES) + 0.5 if weighted else None
    normalize = (lambda local: local * 0.5 + 3.0) if normalized else None
    ref = _stock_upsampled_ce(logits, labels, 4, weights, normalize, IGNORE)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    loss = upsampled_cross_entropy(logits, labels, 4, weights, normalize, IGNORE)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(logits.grad, ref_grad, rtol=1e-5, atol=1e-8)
    first = logits.grad.clone()
    logits.grad = None
    loss.backward()
    torch.testing.assert_close(logits.grad, first, rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        no_grad = upsampled_cross_entropy(logits, labels, 4, weights, normalize, IGNORE)
    torch.testing.assert_close(no_grad, ref, rtol=1e-6, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 inside, whatever autocast says
        amp = upsampled_cross_entropy(logits, labels, 4, weights, normalize, IGNORE)
    assert amp.dtype == torch.float32
    torch.testing.assert_close(
        amp, _stock_upsampled_ce(logits, labels, 4, weights, normalize, IGNORE), rtol=1e-6, atol=0
    )


def test_upsampled_cross_entropy_underflow_and_edge_cases():
    """A pixel whose true-class probability underflows float32 (a logit gap of 200) still gets
    its log-softmax loss, 200 + log(1 + (C - 2) e^-200) = 200; all pixels ignored: 0, connected;
    labels out of range: ValueError."""
    logits = torch.zeros(1, NUM_CLASSES, 1, 1)
    logits[0, 1] = 200.0
    logits.requires_grad_()
    labels = torch.full((1, 4, 4), IGNORE)
    labels[0, 0, 0] = 0
    loss = upsampled_cross_entropy(logits, labels, 4, None, None, IGNORE)
    assert loss.item() == pytest.approx(200.0, rel=1e-6)
    loss.backward()
    (ref_grad,) = torch.autograd.grad(
        _stock_upsampled_ce(logits, labels, 4, None, None, IGNORE), logits
    )
    torch.testing.assert_close(logits.grad, ref_grad, rtol=1e-6, atol=1e-7)
    empty = upsampled_cross_entropy(logits, torch.full((1, 4, 4), IGNORE), 4, None, None, IGNORE)
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="labels must be in"):
        upsampled_cross_entropy(logits, torch.full((1, 4, 4), NUM_CLASSES), 4, None, None, IGNORE)


@pytest.mark.parametrize("name", ["DisAlignSemSegFPNHead", "DisAlignDeepLabV3PlusHead"])
def test_head_grw_loss_gradients_equal_autograd_path(name):
    """The head's GRW loss (upsampled_cross_entropy) against its autograd path
    (fused_pixel_loss = False): the same loss and the same gradients of beta, gamma and the
    confidence layer, everything else frozen."""
    cfg = _cfg(name, SEM_SEG_LOSS="grw", RHO=0.2)
    head, feats = _build_head(name, cfg)
    head.set_class_frequencies(torch.tensor([5000.0, 3000, 800, 100, 50, 10, 1]))
    with torch.no_grad():  # away from the identity, so that every gradient is non-trivial
        head.predictor.logit_scale.uniform_(0.5, 1.5)
        head.predictor.logit_bias.uniform_(-1, 1)
    calibration = [
        "predictor.confidence_layer.bias",
        "predictor.confidence_layer.weight",
        "predictor.logit_bias",
        "predictor.logit_scale",
    ]
    for pname, p in head.named_parameters():
        p.requires_grad_(pname in calibration)
    head.train()
    targets = torch.randint(0, NUM_CLASSES, (2, 32, 32))
    targets[1, 3:9] = IGNORE
    results = []
    for fused in (True, False):
        head.fused_pixel_loss = fused
        head.zero_grad()
        torch.manual_seed(6)  # the same dropout masks (DeepLab's ASPP) in both passes
        _, losses = head(feats, targets)
        losses["loss_sem_seg"].backward()
        grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.requires_grad}
        results.append((losses["loss_sem_seg"].detach(), grads))
    (loss, grads), (ref_loss, ref_grads) = results
    assert sorted(grads) == calibration
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for n in grads:
        assert ref_grads[n].abs().max() > 0
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-7)


def test_grw_without_counts_refuses_to_train():
    head, _ = _build_head("DisAlignSemSegFPNHead", _cfg(SEM_SEG_LOSS="grw"))
    logits, targets = _loss_inputs()
    with pytest.raises(RuntimeError, match="never installed"):
        head.losses(logits, targets)


def test_bad_loss_and_loss_type_name_keys():
    with pytest.raises(ValueError, match="MODEL.DISALIGN.SEM_SEG_LOSS"):
        _build_head("DisAlignSemSegFPNHead", _cfg(SEM_SEG_LOSS="focal"))
    cfg = _cfg("DisAlignDeepLabV3PlusHead", SEM_SEG_LOSS="grw")
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "hard_pixel_mining"
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.LOSS_TYPE"):
        _build_head("DisAlignDeepLabV3PlusHead", cfg)


def test_freeze_all_but_classifier_is_refused():
    from disalign_det.modeling import install_class_weights

    cfg = _cfg(FREEZE="all_but_classifier")
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    with pytest.raises(ValueError, match="MODEL.DISALIGN.FREEZE 'all_but_classifier'"):
        install_class_weights(torch.nn.Module(), cfg)


def test_missing_deeplab_project_names_the_key(monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2.projects.deeplab", None)
    with pytest.raises(ImportError, match="MODEL.SEM_SEG_HEAD.NAME 'DisAlignDeepLabV3PlusHead'"):
        deeplab_project("MODEL.SEM_SEG_HEAD.NAME 'DisAlignDeepLabV3PlusHead'")
    # Both detectron2s we support ship it: the real heads are registered.
    assert isinstance(DisAlignDeepLabV3PlusHead, type) and isinstance(DisAlignDeepLabV3Head, type)


def _tiny_segmentor_cfg():
    cfg = _cfg(SEM_SEG_LOSS="grw", RHO=0.2)
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 8
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 4
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    return cfg


def test_freeze_trains_only_calibration_and_norms_stay_bit_identical():
    torch.manual_seed(3)
    cfg = _tiny_segmentor_cfg()
    cfg.MODEL.DISALIGN.FREEZE = "all_but_calibration"
    model = build_model(cfg)
    apply_freeze(model, "all_but_calibration")
    model.sem_seg_head.set_class_frequencies(torch.arange(1, NUM_CLASSES + 1).float())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "sem_seg_head.predictor.confidence_layer.bias",
        "sem_seg_head.predictor.confidence_layer.weight",
        "sem_seg_head.predictor.logit_bias",
        "sem_seg_head.predictor.logit_scale",
    ]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):
        batch = [
            {
                "image": torch.randint(0, 255, (3, 64, 64)).float(),
                "sem_seg": torch.randint(0, NUM_CLASSES, (64, 64)),
            }
            for _ in range(2)
        ]
        loss = sum(model(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    # Everything but the calibration is bit-identical, BatchNorm running stats included.
    assert changed and all(".predictor." in k for k in changed)
    assert any(k.endswith("running_mean") for k in before)


# ---- pixel counts ----------------------------------------------------------------------------


def _write_labels(folder, n=5, seed=0, num_classes=NUM_CLASSES):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    files, expected = [], np.zeros(num_classes, dtype=np.int64)
    for i in range(n):
        label = rng.integers(0, num_classes, size=(9, 13)).astype(np.uint8)
        label[0, :4] = IGNORE
        path = os.path.join(folder, f"{i}.png")
        Image.fromarray(label).save(path)
        files.append(path)
        for c in range(num_classes):
            expected[c] += int((label == c).sum())
    return files, expected


def test_pixel_counts_parallel_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DISALIGN_CACHE_DIR", str(tmp_path / "cache"))
    files, expected = _write_labels(str(tmp_path / "labels"), n=70)
    assert np.array_equal(count_label_pixels(files, NUM_CLASSES, IGNORE, workers=1), expected)
    assert np.array_equal(count_label_pixels(files, NUM_CLASSES, IGNORE, workers=2), expected)
    assert np.array_equal(pixel_counts(files, NUM_CLASSES, IGNORE, workers=1), expected)
    cached = list((tmp_path / "cache" / "pixel_counts").glob("*.json"))
    assert len(cached) == 1
    # The cache is read (not recounted): a doctored cache file is what comes back.
    doctored = (expected + 1).tolist()
    cached[0].write_text(json.dumps({"counts": doctored}))
    assert pixel_counts(files, NUM_CLASSES, IGNORE).tolist() == doctored
    # Changed content -> another key -> counted again.
    label = np.zeros((9, 13), dtype=np.uint8)
    Image.fromarray(label).save(files[0])
    again = pixel_counts(files, NUM_CLASSES, IGNORE, workers=1)
    assert np.array_equal(again, count_label_pixels(files, NUM_CLASSES, IGNORE))
    assert again[0] > expected[0]  # the all-zero map added class-0 pixels
    assert len(list((tmp_path / "cache" / "pixel_counts").glob("*.json"))) == 2
    assert np.array_equal(again, count_label_pixels(files, NUM_CLASSES, IGNORE))


def test_pixel_counts_reject_out_of_range_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("DISALIGN_CACHE_DIR", str(tmp_path / "cache"))
    files, _ = _write_labels(str(tmp_path / "labels"), n=1, num_classes=NUM_CLASSES + 2)
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        count_label_pixels(files, NUM_CLASSES, IGNORE)


def test_read_ade_object_info(tmp_path):
    path = tmp_path / "objectInfo150.txt"
    lines = ["Idx\tRatio\tTrain\tVal\tName"]
    lines += [f"{i}\t{0.1 / i:.6f}\t{100 - i}\t{50 - i}\tclass{i}" for i in range(1, 4)]
    path.write_text("\n".join(lines) + "\n")
    np.testing.assert_allclose(read_pixel_ratios(str(path), 3), [0.1, 0.05, 0.033333], atol=1e-6)
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        read_pixel_ratios(str(path), 150)
    with pytest.raises(FileNotFoundError, match="PIXEL_RATIOS_FILE"):
        read_pixel_ratios(str(tmp_path / "nope.txt"), 3)


def _register_label_dataset(name, files):
    """Register ``name`` (once) as a dataset of the label PNGs ``files`` with NUM_CLASSES stuff
    classes; returns ``name``."""
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(
            name, lambda: [{"file_name": f, "sem_seg_file_name": f} for f in files]
        )
    MetadataCatalog.get(name).set(stuff_classes=[str(i) for i in range(NUM_CLASSES)])
    return name


def test_pixel_counts_from_cfg_checks_num_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("DISALIGN_CACHE_DIR", str(tmp_path / "cache"))
    files, expected = _write_labels(str(tmp_path / "labels"), n=3)
    name = _register_label_dataset("test_sem_seg_counts_train", files)
    cfg = _cfg()
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATASETS.TEST = ()
    cfg.MODEL.DISALIGN.PIXEL_COUNT_WORKERS = 1
    assert np.array_equal(pixel_counts_from_cfg(cfg), expected)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES + 1
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.NUM_CLASSES"):
        pixel_counts_from_cfg(cfg)


def test_install_class_weights_reads_the_pixel_counts_of_a_segmentor(tmp_path, monkeypatch):
    """The one install_class_weights of the detection and segmentation heads: for a
    SemanticSegmentor config it reads the training pixel counts (not LVIS class counts) and
    installs w_c = (1 / r_c) ** rho / mean; the trainer and the config pre-check both call it."""
    from disalign_det.engine.run_folder import check_config_values
    from disalign_det.modeling import install_class_weights
    from disalign_det.modeling.class_weights import default_counts_reader

    monkeypatch.setenv("DISALIGN_CACHE_DIR", str(tmp_path / "cache"))
    files, expected = _write_labels(str(tmp_path / "labels"), n=3)
    name = _register_label_dataset("test_sem_seg_install_train", files)
    rho = 0.3
    cfg = _cfg(SEM_SEG_LOSS="grw", RHO=rho, PIXEL_COUNT_WORKERS=1)
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATASETS.TEST = ()
    assert default_counts_reader(cfg) is pixel_counts_from_cfg
    head, _ = _build_head("DisAlignSemSegFPNHead", cfg)
    counts = install_class_weights(head, cfg)
    assert np.array_equal(counts, expected)
    r = torch.tensor(expected, dtype=torch.float64) / float(expected.sum())
    w = (1 / r) ** rho
    torch.testing.assert_close(head.pixel_class_weights(), (w / w.mean()).float())
    # An explicit reader replaces the default one.
    other = np.arange(1, NUM_CLASSES + 1)
    assert np.array_equal(install_class_weights(head, cfg, lambda c: other), other)
    w = (other.sum() / torch.tensor(other, dtype=torch.float64)) ** rho
    torch.testing.assert_close(head.pixel_class_weights(), (w / w.mean()).float())
    # A head without GRW reads nothing: the reader is never called.
    plain, _ = _build_head("DisAlignSemSegFPNHead", _cfg(SEM_SEG_LOSS="ce"))
    assert install_class_weights(plain, cfg, lambda c: 1 / 0) is None
    # The config pre-check of the CPU stage-two config's model (on the meta device) installs them
    # too (it used to read the LVIS class counts of the segmentation dataset and fail).
    full = get_cfg()
    add_disalign_config(full)
    full.merge_from_file(
        os.path.join(REPO, "configs/ADE20K/synthetic/disalign_semantic_fpn_synth.yaml")
    )
    full.DATASETS.TRAIN = (name,)
    full.DATASETS.TEST = ()
    full.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES
    full.MODEL.DISALIGN.RHO = rho
    model = check_config_values(full, training=True)
    assert model is not None  # built and checked, not skipped
    assert model.sem_seg_head.pixel_class_weights().shape == (NUM_CLASSES,)


# ---- evaluator -------------------------------------------------------------------------------


def test_frequency_groups_ade_proportions():
    assert [len(g) for g in ADE20K_GROUPS] == [20, 55, 75]
    counts = np.arange(150, 0, -1)  # decreasing: the ADE split by index
    assert frequency_groups(counts) == [list(g) for g in ADE20K_GROUPS]
    groups = frequency_groups([5, 100, 1, 50, 7, 3])  # 6 classes: 1 / 2 / 3
    assert groups == [[1], [3, 4], [0, 2, 5]]


def test_evaluator_head_body_tail_by_hand(tmp_path):
    """Four classes, head {0}, body {1}, tail {2, 3}; IoU and accuracy computed by hand."""
    name = "test_sem_seg_lt_eval"
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, IGNORE], [3, 3, 3, 0]], dtype=np.uint8)
    pred = np.array([[0, 0, 1, 0], [0, 2, 0, 1], [3, 2, 3, 0]])
    path = str(tmp_path / "gt.png")
    Image.fromarray(gt).save(path)
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{"file_name": "img", "sem_seg_file_name": path}])
    MetadataCatalog.get(name).set(
        stuff_classes=["a", "b", "c", "d"], ignore_label=IGNORE, evaluator_type="sem_seg"
    )
    ev = LongTailSemSegEvaluator(
        name,
        groups=[[0], [1], [2, 3]],
        train_pixel_counts=[100, 20, 5, 1],
        distributed=False,
        output_dir=str(tmp_path / "out"),
    )
    ev.reset()
    logits = torch.nn.functional.one_hot(torch.as_tensor(pred), 4).permute(2, 0, 1).float()
    ev.process([{"file_name": "img"}], [{"sem_seg": logits}])
    res = ev.evaluate()["sem_seg"]
    # Class 0: gt 4 pixels, predicted on 6 non-ignored pixels, tp 4 -> iou 4/6, acc 1.
    # Class 1: gt 2, predicted on 1 non-ignored pixel (its prediction on the ignored pixel (1, 3)
    #   does not count), tp 1 -> iou 1/2, acc 1/2.
    # Class 2: gt 2, pred 2, tp 1 -> iou 1/3, acc 1/2.
    # Class 3: gt 3, pred 2, tp 2 -> iou 2/3, acc 2/3.
    iou = [2 / 3, 0.5, 1 / 3, 2 / 3]
    acc = [1.0, 0.5, 0.5, 2 / 3]
    assert res["mIoU"] == pytest.approx(100 * np.mean(iou))
    assert res["mIoU-head"] == pytest.approx(100 * iou[0])
    assert res["mIoU-body"] == pytest.approx(100 * iou[1])
    assert res["mIoU-tail"] == pytest.approx(100 * (iou[2] + iou[3]) / 2)
    assert res["mACC-head"] == pytest.approx(100 * acc[0])
    assert res["mACC-body"] == pytest.approx(100 * acc[1])
    assert res["mACC-tail"] == pytest.approx(100 * (acc[2] + acc[3]) / 2)
    rows = json.loads((tmp_path / "out" / "per_class_iou.json").read_text())
    assert [r["group"] for r in rows] == ["head", "body", "tail", "tail"]
    assert [r["IoU"] for r in rows] == pytest.approx([100 * v for v in iou])
    assert (tmp_path / "out" / "per_class_iou.csv").is_file()
    assert (tmp_path / "out" / "per_class_iou.png").is_file()
    with pytest.raises(ValueError, match="TEST.SEM_SEG_GROUPS"):
        LongTailSemSegEvaluator(name, groups=[[0], [1], [2]], distributed=False)


def test_iou_of_absent_class_is_nan():
    conf = np.zeros((4, 4), dtype=np.int64)  # 3 classes + ignore; [pred, gt]
    conf[0, 0] = 5
    conf[1, 0] = 1  # class 1 predicted, never in the ground truth
    iou, acc = iou_and_accuracy(conf)
    # Class 0: gt 6, predicted 5, tp 5.
    assert iou[0] == pytest.approx(5 / 6) and acc[0] == pytest.approx(5 / 6)
    assert np.isnan(iou[1]) and np.isnan(acc[1]) and np.isnan(iou[2])


def test_prepare_ade20k_checks_and_converts(tmp_path):
    from common import load_script

    prep = load_script("datasets/prepare_ade20k.py")
    assert "ADEChallengeData2016 is missing" in prep.check(str(tmp_path))[0]
    ade = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (ade / "images" / split).mkdir(parents=True)
        (ade / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(ade / "images" / split / "ADE_1.jpg")
        raw = np.array([[0, 1, 150, 7]] * 4, dtype=np.uint8)  # 0 = "other"
        Image.fromarray(raw).save(ade / "annotations" / split / "ADE_1.png")
    problems = prep.check(str(tmp_path))
    assert any("annotations_detectron2/training/ is missing" in p for p in problems)
    assert any("objectInfo150.txt is missing" in p for p in problems)
    problems = prep.check(str(tmp_path), convert=True)
    converted = np.asarray(Image.open(ade / "annotations_detectron2" / "training" / "ADE_1.png"))
    assert converted[0].tolist() == [255, 0, 149, 6]
    # What remains: the fixture is not the full download (image counts) and has no objectInfo150.
    assert sorted(p.split(" has ")[0] for p in problems if "images" in p) == [
        "images/training/",
        "images/validation/",
    ]
    assert len(problems) == 3
    assert prep.main(["--root", str(tmp_path)]) == 1


# --------------------------------------------------------------------------------------------------
# The generated long-tail segmentation data (sem_seg_synth_lt): its class profile and its cache
# --------------------------------------------------------------------------------------------------


def test_variant_images_one_geometric_run_parents_unchanged():
    from disalign_det.data.synthetic import families, synthetic_styles

    styles = synthetic_styles("lvis")
    variants = [i for i, s in enumerate(styles) if s.parent is not None]
    parents = [i for i, s in enumerate(styles) if s.parent is None]
    lvis = families.family_profile(styles, 700, np.random.default_rng(3))
    flat = families.family_profile(styles, 700, np.random.default_rng(3), variant_images=(60, 6))
    # The variants: 60 * (6 / 60) ** (k / 39), rounded, k = 0..39, dealt in a random order.
    expected = [int(round(60 * 0.1 ** (k / 39))) for k in range(len(variants))]
    assert sorted(flat[variants].tolist(), reverse=True) == expected
    # LVIS's buckets otherwise: common 90 -> 12, rare 10 -> 2 (23 + 17 variants).
    assert max(lvis[variants]) == 90 and min(lvis[variants]) == 2
    # The same draws from the rng: the parents' counts and the variants' ranking are unchanged.
    assert flat[parents].tolist() == lvis[parents].tolist()
    a, b = lvis[variants], flat[variants]
    assert all(b[i] >= b[j] for i in range(len(a)) for j in range(len(a)) if a[i] > a[j])


def test_variant_images_needs_families():
    from disalign_det.data.synthetic import plan_images

    with pytest.raises(ValueError, match="variant_images"):
        plan_images(preset="basic", variant_images=(60, 6))


def test_sem_seg_synth_plan_has_the_flat_variant_tail():
    from disalign_det.data.sem_seg_synth import DEFAULTS
    from disalign_det.data.synthetic import plan_images, synthetic_styles

    styles = synthetic_styles("lvis")
    p = DEFAULTS
    plans = plan_images(
        preset="lvis",
        seed=0,
        num_train_images=p["num_train_images"],
        num_val_images=p["num_val_images"],
        image_size=p["image_size"],
        max_objects_per_image=p["max_objects_per_image"],
        variant_images=tuple(p["variant_images"]),
    )
    images = np.zeros(len(styles), dtype=int)
    for plan in plans["train"]:
        images[sorted(set(plan.objects))] += 1
    most, fewest = p["variant_images"]
    variants = [i for i, s in enumerate(styles) if s.parent is not None]
    # Exact image counts of the variants (the plan keeps the profile's counts).
    assert sorted(images[variants].tolist()) == sorted(
        int(round(most * (fewest / most) ** (k / (len(variants) - 1))))
        for k in range(len(variants))
    )
    assert all(len(plan.objects) <= p["max_objects_per_image"] for plan in plans["train"])
    # Every class is in the val split (tail IoU is defined).
    val = set(c for plan in plans["val"] for c in plan.objects)
    assert val == set(range(len(styles)))


def test_sem_seg_synth_cache_regenerates_on_other_parameters(tmp_path, monkeypatch):
    from disalign_det.data import sem_seg_synth

    calls = []

    def fake_generate(out_dir, **params):
        calls.append(params)
        return {}

    monkeypatch.setattr(sem_seg_synth, "generate_synthetic_sem_seg", fake_generate)
    out = os.path.join(str(tmp_path), sem_seg_synth.SEM_SEG_SYNTH_SUBDIR)
    os.makedirs(out)
    # A dataset of the first generator version (no object_scale / variant_images): regenerated.
    with open(os.path.join(out, sem_seg_synth.STAMP), "w") as f:
        json.dump({"version": 1, "seed": 0, "num_train_images": 700, "num_val_images": 100}, f)
    sem_seg_synth.ensure_sem_seg_synth(str(tmp_path))
    assert len(calls) == 1
    with open(os.path.join(out, sem_seg_synth.STAMP)) as f:
        stamp = json.load(f)
    assert stamp["version"] == sem_seg_synth.VERSION
    assert stamp["variant_images"] == list(sem_seg_synth.DEFAULTS["variant_images"])
    # Current (the tuple parameter read back from json as a list): not generated again.
    sem_seg_synth.ensure_sem_seg_synth(str(tmp_path))
    assert len(calls) == 1
    # Another parameter: generated again.
    sem_seg_synth.ensure_sem_seg_synth(str(tmp_path), object_scale=1.0)
    assert len(calls) == 2 and calls[1]["object_scale"] == 1.0


def test_sem_seg_synth_textures_variants_only():
    """A variant's visible pixels get its detail's texture, value * 0.55 rounded where the pattern
    is on (bar: horizontal stripes of 3 px); its parent and the background are unchanged."""
    from disalign_det.data.sem_seg_synth import SHADE, _texture_variants
    from disalign_det.data.synthetic import synthetic_styles

    styles = synthetic_styles("lvis")
    variant = next(i for i, s in enumerate(styles) if s.detail == "bar")
    parent = next(i for i, s in enumerate(styles) if s.name == styles[variant].parent)
    label = np.zeros((12, 10), dtype=np.uint8)
    label[:, :4] = variant + 1
    label[:, 6:] = parent + 1
    pixels = np.full((12, 10, 3), 200, dtype=np.uint8)
    out = _texture_variants(pixels, label, styles)
    stripes = (np.arange(12) // 3) % 2 == 0  # rows 0-2, 6-8 dark
    expected = pixels.copy()
    expected[stripes, :4] = int(round(200 * SHADE))
    assert np.array_equal(out, expected)
