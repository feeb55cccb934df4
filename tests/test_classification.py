"""DisAlign for image classification: the model (identity at init, calibration and GRW maths
against the written formulas, freezing, the frozen trunk without autograd), the torchvision
converter and the long-tail metrics against hand computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from disalign_det.evaluation.classification_evaluation import (
    ClassificationEvaluator,
    classification_metrics,
    shot_split,
)
from disalign_det.modeling import apply_freeze
from disalign_det.modeling.classification import (
    DisAlignClassifierHead,
    ImageClassifier,
    build_classification_resnet,
    convert_torchvision_resnet,
)

C = 7


def tiny_model(**kwargs):
    backbone = build_classification_resnet(18, stem_out_channels=8, res2_out_channels=8)
    args = dict(num_classes=C, pixel_mean=[120.0] * 3, pixel_std=[60.0] * 3)
    args.update(kwargs)
    return ImageClassifier(backbone=backbone, **args)


def batch(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
            "label": int(i % C),
        }
        for i in range(n)
    ]


def test_identity_at_init_and_calibration_formula():
    torch.manual_seed(0)
    plain = tiny_model().eval()
    calibrated = tiny_model(calibration=True).eval()
    missing = calibrated.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == [
        "head.confidence_layer.bias",
        "head.confidence_layer.weight",
        "head.logit_bias",
        "head.logit_scale",
    ]
    inputs = batch()
    with torch.no_grad():
        z = torch.stack([o["logits"] for o in plain(inputs)])
        z_cal = torch.stack([o["logits"] for o in calibrated(inputs)])
    assert z.shape == (4, C)
    assert (z_cal - z).abs().max() <= 1e-6
    # Random beta, gamma, s: z' = s (beta z + gamma) + (1 - s) z, written out.
    head = calibrated.head
    with torch.no_grad():
        head.logit_scale.uniform_(0.5, 2.0)
        head.logit_bias.uniform_(-1.0, 1.0)
        head.confidence_layer.weight.normal_(std=0.1)
        head.confidence_layer.bias.fill_(0.3)
        x = calibrated.features(calibrated.preprocess(inputs))
        s = torch.sigmoid(x @ head.confidence_layer.weight.t() + head.confidence_layer.bias)
        zz = x @ head.cls_score.weight.t() + head.cls_score.bias
        expected = s * (head.logit_scale * zz + head.logit_bias) + (1 - s) * zz
        got = torch.stack([o["logits"] for o in calibrated(inputs)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_grw_loss_against_the_formula_and_rho_zero_is_plain_ce():
    counts = torch.tensor([100, 50, 20, 10, 5, 2, 1])
    rho = 1.2
    torch.manual_seed(0)
    model = tiny_model(loss="grw", rho=rho, class_counts=counts).train()
    # w_j = (1 / r_j) ** rho, r_j = n_j / sum(n), scaled so that sum_j w_j = C.
    r = counts.double() / counts.sum()
    w = (1 / r) ** rho
    w = w * C / w.sum()
    torch.testing.assert_close(model.class_weights.double(), w, rtol=1e-5, atol=1e-6)
    inputs = batch(6)
    labels = torch.tensor([d["label"] for d in inputs])
    loss = model(inputs)["loss_cls"]
    # Weighted mean: sum_i w[y_i] CE_i / sum_i w[y_i] (training-mode BN: batch statistics).
    x = model.features(model.preprocess(inputs))
    z = model.head(x)
    ce = -F.log_softmax(z.double(), 1)[torch.arange(6), labels]
    expected = (w[labels] * ce).sum() / w[labels].sum()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    # rho = 0: all weights 1, exactly plain cross-entropy.
    zero = tiny_model(loss="grw", rho=0.0, class_counts=counts)
    zero.load_state_dict(model.state_dict())
    torch.testing.assert_close(zero.class_weights, torch.ones(C))
    plain = tiny_model(loss="ce")
    plain.load_state_dict(model.state_dict())
    torch.manual_seed(2)
    a = zero(inputs)["loss_cls"]
    torch.manual_seed(2)
    b = plain(inputs)["loss_cls"]
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    z0 = zero.head(zero.features(zero.preprocess(inputs)))
    assert float(b.detach()) == pytest.approx(float(F.cross_entropy(z0, labels).detach()), rel=1e-5)


def test_grw_needs_counts_of_the_right_size():
    with pytest.raises(ValueError, match="class_counts"):
        tiny_model(loss="grw", rho=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        tiny_model(loss="grw", rho=1.0, class_counts=[1, 2])
    with pytest.raises(ValueError, match="model.loss"):
        tiny_model(loss="focal")


def test_freezing_trains_only_the_calibration_and_the_trunk_runs_without_autograd():
    model = tiny_model(calibration=True, loss="grw", rho=1.0, class_counts=[5] * C)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_freeze(model, "all_but_calibration")
    model.train()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "head.confidence_layer.bias",
        "head.confidence_layer.weight",
        "head.logit_bias",
        "head.logit_scale",
    ]
    assert model.trunk_frozen()
    feats = model.features(model.preprocess(batch()))
    assert not feats.requires_grad  # no graph through the trunk
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        loss = model(batch())["loss_cls"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed == [
        "head.confidence_layer.bias",
        "head.confidence_layer.weight",
        "head.logit_bias",
        "head.logit_scale",
    ]  # BatchNorm running statistics untouched: frozen norms run in eval mode


def test_crt_freeze_trains_the_classifier_only():
    model = apply_freeze(tiny_model(), "all_but_classifier")
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "head.cls_score.bias",
        "head.cls_score.weight",
    ]


def test_tau_norm_divides_rows_by_their_norm_power():
    head = DisAlignClassifierHead(5, 3, tau_norm=0.7).eval()
    x = torch.randn(4, 5)
    w, b = head.cls_score.weight, head.cls_score.bias
    expected = x @ (w / w.norm(dim=1, keepdim=True) ** 0.7).t() + b
    torch.testing.assert_close(head(x), expected)
    head.train()  # training is never tau-normalised
    torch.testing.assert_close(head(x), head.cls_score(x))


@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("resnet50", dict(depth=50)),
        ("resnext50_32x4d", dict(depth=50, num_groups=32, width_per_group=4)),
    ],
)
def test_torchvision_weights_convert_to_the_same_logits(arch, kwargs):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(weights=None, num_classes=11).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong mapping shows
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    model = ImageClassifier(
        backbone=build_classification_resnet(**kwargs),
        num_classes=11,
        pixel_mean=[0.0] * 3,
        pixel_std=[1.0] * 3,
    ).eval()
    state = convert_torchvision_resnet(tv.state_dict(), keep_fc=True)
    incompatible = model.load_state_dict(state, strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tv(x)
        got = torch.stack([o["logits"] for o in model([{"image": im} for im in x])])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # Without keep_fc the classifier is left out (another class count).
    assert not any(k.startswith("head.") for k in convert_torchvision_resnet(tv.state_dict()))
    with pytest.raises(ValueError, match="unknown torchvision key 'foo'"):
        convert_torchvision_resnet({"foo": torch.zeros(1)})


def test_resnext_bottleneck_widths():
    net = build_classification_resnet(50, num_groups=32, width_per_group=4)
    # ResNeXt-50 32x4d: bottleneck 128 -> 1024 channels, grouped 3x3 convs, 2048 out.
    assert net.res2[0].conv2.weight.shape == (128, 4, 3, 3)
    assert net.res5[0].conv2.weight.shape == (1024, 32, 3, 3)
    assert net.output_shape()["res5"].channels == 2048
    assert len(build_classification_resnet(152).res4) == 36


def test_shot_split_and_metrics_against_a_hand_computation():
    train_counts = [150, 101, 100, 20, 19, 3]
    assert list(shot_split(train_counts, 100, 20)) == [
        "many",
        "many",
        "medium",
        "medium",
        "few",
        "few",
    ]
    # 8 test images; top-5 lists (C = 6) best first.
    labels = np.array([0, 0, 1, 2, 3, 4, 5, 5])
    top = np.array(
        [
            [0, 1, 2, 3, 4],  # correct
            [1, 0, 2, 3, 4],  # wrong, in top-5
            [1, 2, 3, 4, 5],  # correct
            [0, 1, 3, 4, 5],  # wrong, not in top-5
            [3, 0, 1, 2, 4],  # correct
            [0, 1, 2, 3, 5],  # wrong, not in top-5
            [5, 0, 1, 2, 3],  # correct
            [0, 1, 2, 3, 4],  # wrong, not in top-5
        ]
    )
    m = classification_metrics(labels, top, train_counts, 100, 20)
    assert m["top1"] == pytest.approx(100 * 4 / 8)
    assert m["top5"] == pytest.approx(100 * 5 / 8)
    # Per-class accuracy: c0 1/2, c1 1, c2 0, c3 1, c4 0, c5 1/2.
    np.testing.assert_allclose(m["per_class"], [50, 100, 0, 100, 0, 50])
    assert m["many_top1"] == pytest.approx((50 + 100) / 2)
    assert m["medium_top1"] == pytest.approx((0 + 100) / 2)
    assert m["few_top1"] == pytest.approx((0 + 50) / 2)
    # F1 = 2TP / (2TP + FP + FN). Predictions: 0,1,1,0,3,0,5,0 ->
    # c0 TP1 FP3 FN1: 2/6; c1 TP1 FP1 FN0: 2/3; c2 TP0 FN1: 0; c3 TP1: 1; c4 FN1: 0;
    # c5 TP1 FN1: 2/3.
    f1 = [2 / 6, 2 / 3, 0, 1, 0, 2 / 3]
    assert m["macro_f1"] == pytest.approx(100 * sum(f1) / 6)


def test_evaluator_process_evaluate_and_per_class_files(tmp_path):
    from detectron2.data import MetadataCatalog

    name = "cls_eval_test_dataset"
    MetadataCatalog.get(name).set(
        class_image_count=[150, 101, 100, 20, 19, 3], many_threshold=100, few_threshold=20
    )
    ev = ClassificationEvaluator(name, output_dir=str(tmp_path))
    ev.reset()
    labels = [0, 1, 4, 5]
    logits = torch.eye(6)[[0, 1, 3, 2]]  # predicts 0, 1, 3, 2: two correct
    ev.process([{"label": y} for y in labels], [{"logits": z} for z in logits])
    res = ev.evaluate()["classification"]
    assert res["top1"] == pytest.approx(50.0)
    assert res["many_top1"] == pytest.approx(100.0)
    assert res["few_top1"] == pytest.approx(0.0)
    assert math.isnan(res["medium_top1"])  # no test image of a medium class
    rows = (tmp_path / "per_class_accuracy.csv").read_text().splitlines()
    assert rows[0] == "class,train_images,split,top1" and rows[1] == "0,150,many,100.00"
    assert rows[3] == "2,100,medium,"  # absent from the test set
    assert (tmp_path / "per_class_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ev.reset()
    assert ev.evaluate() == {}


def test_yaml_path_builds_the_same_classifier_as_the_arguments():
    """``META_ARCHITECTURE: "ImageClassifier"`` in a YAML config (MODEL.RESNETS + MODEL.CLASSIFIER)
    builds the model the keyword arguments build: same tensors, same logits, same loss."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from disalign_det import add_disalign_config

    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "ImageClassifier"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 8
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 8
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [120.0] * 3, [60.0] * 3
    cfg.MODEL.CLASSIFIER.NUM_CLASSES = C
    cfg.MODEL.CLASSIFIER.CALIBRATION = True
    torch.manual_seed(0)
    from_yaml = build_model(cfg)
    torch.manual_seed(0)
    from_args = tiny_model(calibration=True)
    a, b = from_yaml.state_dict(), from_args.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    from_yaml.eval(), from_args.eval()
    with torch.no_grad():
        assert torch.equal(from_yaml(batch())[0]["logits"], from_args(batch())[0]["logits"])
    from_yaml.train(), from_args.train()
    assert torch.equal(from_yaml(batch())["loss_cls"], from_args(batch())["loss_cls"])
