"""Classification through tools/lazyconfig_train_net.py: every config builds and trains one CPU
iteration (stage two from the stage one it names, loaded strictly), an interrupted and resumed
run equals an uninterrupted one bit for bit, and stage-one loading refuses anything but missing
calibration keys."""

import glob
import os

import pytest
import torch
from conftest import REPO, load_script
from test_classification_data import make_public_layout

from disalign_det.data.classification import register_builtin_classification

CPU = "configs/Classification-CPU"
# (stage one, [stage twos]) of every config; the public ones run on a tiny fake layout.
PUBLIC = {
    "ImageNet-LT/resnext50.py": ["ImageNet-LT/disalign_resnext50.py"],
    "ImageNet-LT/resnet50.py": ["ImageNet-LT/disalign_resnet50.py"],
    "iNaturalist2018/resnet50.py": ["iNaturalist2018/disalign_resnet50.py"],
    "iNaturalist2018/resnet152.py": ["iNaturalist2018/disalign_resnet152.py"],
    "Places-LT/resnet152.py": ["Places-LT/disalign_resnet152.py"],
}
CPU_CONFIGS = {
    "Classification-CPU/digits_lt.py": [
        "Classification-CPU/disalign_digits_lt.py",
        "Classification-CPU/crt_digits_lt.py",
    ],
    "Classification-CPU/synth_cls_lt.py": [
        "Classification-CPU/disalign_synth_cls_lt.py",
        "Classification-CPU/crt_synth_cls_lt.py",
    ],
}
# A small public config on CPU: 64 px, batch 2, no workers, a fixed seed. The test trains stage
# one from random weights at batch 2 (the real configs start from ImageNet weights or train at
# batch 256); zero-initialised residual branches keep that one step sane. Without them a
# ResNet-152's gradients at batch 2 reached 1e4, the step at LR 0.01 moved weights by up to ~100,
# and stage two's forward (norms in eval mode) gave logits of 1e13-1e24, now and then overflowing
# to NaN (it failed one CI run).
SMALL = [
    "train.seed=0",
    "model.backbone.zero_init_residual=True",
    "train.device=cpu",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.train.mapper.image_size=64",
    "dataloader.test.mapper.image_size=64",
    "dataloader.test.mapper.resize_size=72",
    "dataloader.test.num_workers=0",
    "dataloader.test.batch_size=2",
]


def test_every_config_is_listed():
    found = set()
    for folder in ("ImageNet-LT", "iNaturalist2018", "Places-LT", "Classification-CPU"):
        found |= {
            os.path.relpath(p, os.path.join(REPO, "configs"))
            for p in glob.glob(os.path.join(REPO, "configs", folder, "*.py"))
        }
    listed = set(PUBLIC) | set(CPU_CONFIGS)
    for twos in list(PUBLIC.values()) + list(CPU_CONFIGS.values()):
        listed |= set(twos)
    assert found == listed


def _run(*argv):
    tool = load_script("tools/lazyconfig_train_net.py")
    return tool.main(tool.default_argument_parser().parse_args(list(argv)))


def _train_pair(tmp_path, stage_one, stage_twos, opts):
    out1 = tmp_path / "one"
    cfg = os.path.join(REPO, "configs", stage_one)
    res = _run(
        "--config-file",
        cfg,
        f"train.output_dir={out1}",
        "train.max_iter=1",
        "train.init_checkpoint=",
        *opts,
    )
    assert "top1" in res["classification"]
    ckpt = out1 / "model_final.pth"
    before = torch.load(ckpt, weights_only=False)["model"]
    for i, two in enumerate(stage_twos):
        out2 = tmp_path / f"two{i}"
        res = _run(
            "--config-file",
            os.path.join(REPO, "configs", two),
            f"train.output_dir={out2}",
            "train.max_iter=1",
            f"train.init_checkpoint={ckpt}",
            *opts,
        )
        for key in ("top1", "many_top1", "medium_top1", "few_top1", "macro_f1"):
            assert key in res["classification"]
        after = torch.load(out2 / "model_final.pth", weights_only=False)["model"]
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        # Stage two moves only the classifier (cRT) or nothing of the stage one (DisAlign).
        assert changed <= {"head.cls_score.weight", "head.cls_score.bias"}, changed
        assert ("crt" in two) == bool(changed)
        if "disalign" in two:
            assert "head.logit_scale" in after and "head.logit_scale" not in before


@pytest.mark.slow
@pytest.mark.parametrize("stage_one", sorted(CPU_CONFIGS))
def test_cpu_configs_train_one_iteration(tmp_path, stage_one):
    _train_pair(tmp_path, stage_one, CPU_CONFIGS[stage_one], ["dataloader.test.batch_size=256"])


@pytest.mark.parametrize(
    "stage_one",
    [
        pytest.param("ImageNet-LT/resnext50.py", marks=pytest.mark.slow),
        pytest.param("ImageNet-LT/resnet50.py", marks=pytest.mark.slow),
        pytest.param("iNaturalist2018/resnet50.py", marks=pytest.mark.slow),
        pytest.param("iNaturalist2018/resnet152.py", marks=pytest.mark.slow),
        pytest.param("Places-LT/resnet152.py", marks=pytest.mark.slow),
    ],
)
def test_public_configs_train_one_iteration(tmp_path, stage_one):
    register_builtin_classification(make_public_layout(str(tmp_path / "data")))
    try:
        _train_pair(tmp_path, stage_one, PUBLIC[stage_one], SMALL)
    finally:
        register_builtin_classification()


def test_public_configs_follow_their_recipes():
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(os.path.join(REPO, "configs", "ImageNet-LT", "disalign_resnext50.py"))
    one = LazyConfig.load(os.path.join(REPO, "configs", "ImageNet-LT", "resnext50.py"))
    # The official recipe: ResNeXt-50 32x4d, batch 256, 90 + 10 epochs of 115,846 images,
    # LR 0.1, weight decay 5e-4, GRW exponent 1.2, calibration only.
    assert (one.model.backbone.num_groups, one.model.backbone.width_per_group) == (32, 4)
    assert one.train.max_iter == round(115846 * 90 / 256)
    assert cfg.train.max_iter == round(115846 * 10 / 256)
    assert cfg.dataloader.train.total_batch_size == 256
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (0.1, 5e-4)
    assert (cfg.model.rho, cfg.model.loss, cfg.model.calibration) == (1.2, "grw", True)
    assert cfg.disalign.freeze == "all_but_calibration"
    assert cfg.dataloader.train.mapper.color_jitter == 0.4
    places = LazyConfig.load(os.path.join(REPO, "configs", "Places-LT", "resnet152.py"))
    assert places.model.backbone.depth == 152 and places.train.init_checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_resume_is_exact(tmp_path, workers):
    cfg = os.path.join(REPO, CPU, "digits_lt.py")
    # A constant LR (cosine from 1 to 1): the schedule scales with train.max_iter, which differs
    # between the interrupted run (2) and the whole one (4); everything else must match.
    common = [
        "train.checkpointer.period=2",
        "train.eval_period=0",
        "train.seed=5",
        "lr_multiplier.scheduler.end_value=1.0",
        f"dataloader.train.num_workers={workers}",
    ]
    _run("--config-file", cfg, f"train.output_dir={tmp_path}/full", "train.max_iter=4", *common)
    part = tmp_path / "part"
    _run("--config-file", cfg, f"train.output_dir={part}", "train.max_iter=2", *common)
    os.remove(part / "model_final.pth")  # resume from model_0000001.pth
    with open(part / "last_checkpoint", "w") as f:
        f.write("model_0000001.pth")
    _run("--config-file", cfg, "--resume", f"train.output_dir={part}", "train.max_iter=4", *common)
    a = torch.load(tmp_path / "full" / "model_final.pth", weights_only=False)
    b = torch.load(part / "model_final.pth", weights_only=False)
    assert a["iteration"] == b["iteration"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def _stage_two(config="disalign_digits_lt.py", **overrides):
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(os.path.join(REPO, CPU, config))
    return LazyConfig.apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])


def test_every_config_builds_its_model():
    from detectron2.config import LazyConfig, instantiate

    for stage_one, twos in {**PUBLIC, **CPU_CONFIGS}.items():
        # A public stage two holds its stage one's trunk: built once (ResNet-152 takes seconds).
        for name in ([stage_one] if stage_one in CPU_CONFIGS else []) + twos:
            cfg = LazyConfig.load(os.path.join(REPO, "configs", name))
            if cfg.model.get("class_counts") is not None:
                cfg.model.class_counts = [1] * cfg.model.num_classes  # no dataset needed
            model = instantiate(cfg.model)
            assert model.head.cls_score.out_features == cfg.model.num_classes
            assert model.head.calibration == name.split("/")[-1].startswith("disalign"), name


def test_stage_one_loading_refuses_other_checkpoints(tmp_path):
    from detectron2.config import instantiate

    from disalign_det.lazy.train import build_checkpointer, build_stage_two_model

    one = instantiate(_stage_two("digits_lt.py").model)
    torch.save({"model": one.state_dict()}, tmp_path / "one.pth")
    cfg = _stage_two(**{"train.output_dir": str(tmp_path / "out")})
    model = build_stage_two_model(cfg)
    # The right stage one: only the calibration is missing.
    build_checkpointer(cfg, model).load(str(tmp_path / "one.pth"), checkpointables=[])
    # Another class count.
    wrong = {k: v for k, v in one.state_dict().items()}
    wrong["head.cls_score.weight"] = torch.zeros(11, 128)
    wrong["head.cls_score.bias"] = torch.zeros(11)
    torch.save({"model": wrong}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="shape mismatch"):
        build_checkpointer(cfg, model).load(str(tmp_path / "wrong.pth"), checkpointables=[])
    # A trunk parameter missing.
    partial = {k: v for k, v in one.state_dict().items() if "res5" not in k}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lacks"):
        build_checkpointer(cfg, model).load(str(tmp_path / "partial.pth"), checkpointables=[])
    # No stage one at all: the tool refuses before anything runs.
    with pytest.raises(ValueError, match="train.init_checkpoint"):
        _run(
            "--config-file",
            os.path.join(REPO, CPU, "disalign_digits_lt.py"),
            f"train.output_dir={tmp_path}/c",
            "train.init_checkpoint=",
        )
