"""DisAlign on LazyConfig models: ViTDet's LVIS Mask R-CNN / Cascade (sigmoid CE + federated loss)
with a tiny ViT on CPU, from a stage one saved by the LazyConfig model itself.

Needs detectron2 main (ViT, SimpleFeaturePyramid, federated loss) and ViTDet's configs from a
detectron2 checkout ($DETECTRON2_ROOT, see disalign_det.lazy.find_project_config).
"""

import json
import os

import pytest
import torch
from conftest import REPO, load_script

try:
    from detectron2.modeling import SimpleFeaturePyramid  # noqa: F401  (detectron2 main only)

    HAS_VIT = True
except ImportError:
    HAS_VIT = False

pytestmark = pytest.mark.skipif(
    not HAS_VIT, reason="needs detectron2 main (ViT backbones, LazyConfig ViTDet); v0.6 has none"
)

K = 1203
CONFIGS = {
    "mask_rcnn": "disalign_mask_rcnn_vitdet_b_100ep.py",
    "cascade": "disalign_cascade_mask_rcnn_vitdet_b_100ep.py",
}
STAGE_ONE = {
    "mask_rcnn": "LVIS/mask_rcnn_vitdet_b_100ep.py",
    "cascade": "LVIS/cascade_mask_rcnn_vitdet_b_100ep.py",
}

# A LazyConfig file that loads CONFIG and shrinks it for a CPU test (tiny ViT, 128 px, 1203
# classes, the generated 1203-class dataset); every DisAlign and ViTDet setting is kept.
TINY = """
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L, LazyConfig
from detectron2.layers import ShapeSpec

_c = LazyConfig.load({config!r})
dataloader, model, optimizer, lr_multiplier, train = (
    _c.dataloader, _c.model, _c.optimizer, _c.lr_multiplier, _c.train
)
if "disalign" in _c:
    disalign = _c.disalign
_C, _F, _S = 32, 64, 128
model.backbone.net.update(
    img_size=_S, embed_dim=48, depth=2, num_heads=2, window_size=4, window_block_indexes=[0]
)
model.backbone.update(out_channels=_C, square_pad=_S)
model.proposal_generator.head.in_channels = _C
model.proposal_generator.update(pre_nms_topk=(200, 100), post_nms_topk=(64, 40))
_r = model.roi_heads
_r.batch_size_per_image = 32
_heads = _r.box_heads if "box_heads" in _r else [_r.box_head]
_preds = _r.box_predictors if "box_predictors" in _r else [_r.box_predictor]
for _h in _heads:
    _h.update(input_shape=ShapeSpec(channels=_C, height=7, width=7), conv_dims=[_C], fc_dims=[_F])
for _p in _preds:
    _p.update(input_shape=ShapeSpec(channels=_F), test_topk_per_image=30)
_r.mask_head.update(input_shape=ShapeSpec(channels=_C, width=14, height=14), conv_dims=[_C, _C])
dataloader.train.dataset.names = "tiny1203_train"
dataloader.test.dataset.names = "tiny1203_val"
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    # ViTDet's LSJ crop (FixedSizeCrop) needs shapely for polygons, an optional detectron2
    # dependency; a resize keeps the test to detectron2's requirements.
    L(T.ResizeShortestEdge)(short_edge_length=_S, max_size=_S),
]
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=_S, max_size=_S)]
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.num_workers = 0
if "evaluator" in dataloader and "max_dets_per_image" in dataloader.evaluator:
    dataloader.evaluator.max_dets_per_image = 30
train.update(device="cpu", max_iter=3, eval_period=3, log_period=1, output_dir={output_dir!r})
train.init_checkpoint = {init!r}
train.amp.enabled = False
train.checkpointer.period = 2
lr_multiplier.scheduler.update(values=[1.0, 0.1], milestones=[2], num_updates=3)
lr_multiplier.warmup_length = 0.0
for _p in _preds:
    _p.update({classifier})
"""


@pytest.fixture(scope="module")
def tiny1203(tiny_dataset, tmp_path_factory):
    """The tiny generated dataset as a 1203-class LVIS-format dataset: its classes are ids 1-6,
    labelled r, r, c, c, f, f (so every APr/APc/APf has ground truth); ids 7-1203 have no
    annotation and image/instance count 1 (the federated loss samples among counted classes)."""
    from disalign_det.data import register_lvis_format

    folder = tmp_path_factory.mktemp("tiny1203")
    paths = {}
    for split in ("train", "val"):
        with open(tiny_dataset[f"{split}_json"]) as f:
            data = json.load(f)
        cats = sorted(data["categories"], key=lambda c: c["id"])
        for c, freq in zip(cats, "rrccff"):
            c["frequency"] = freq
        for i in range(len(cats) + 1, K + 1):
            cats.append(
                {
                    "id": i,
                    "name": f"pad_{i}",
                    "synset": f"pad_{i}.n.01",
                    "synonyms": [f"pad_{i}"],
                    "def": "",
                    "frequency": "rcf"[i % 3],
                    "image_count": 1,
                    "instance_count": 1,
                }
            )
        data["categories"] = cats
        path = folder / f"tiny1203_{split}.json"
        path.write_text(json.dumps(data))
        register_lvis_format(f"tiny1203_{split}", str(path), tiny_dataset["image_root"])
        paths[split] = str(path)
    paths["image_root"] = tiny_dataset["image_root"]
    return paths


def _find(relpath):
    from disalign_det.lazy import find_project_config

    try:
        return find_project_config(relpath)
    except FileNotFoundError as e:
        pytest.skip(str(e))


# Box classifiers: ViTDet's LVIS configs use sigmoid CE with the federated loss.
CLASSIFIERS = {
    "sigmoid_fed": "use_sigmoid_ce=True, use_fed_loss=True",
    "sigmoid": "use_sigmoid_ce=True, use_fed_loss=False",
    "softmax": "use_sigmoid_ce=False, use_fed_loss=False",
}


def tiny_config(tmp_path, base, output_dir="", init="", classifier="sigmoid_fed"):
    """Write the tiny LazyConfig of ``base`` (a config path) in ``tmp_path``; returns the path."""
    path = tmp_path / f"tiny_{classifier}_{os.path.basename(base)}"
    text = TINY.format(
        config=str(base),
        output_dir=str(output_dir),
        init=str(init),
        classifier=CLASSIFIERS[classifier],
    )
    path.write_text(text)
    return str(path)


def load(path):
    from detectron2.config import LazyConfig

    return LazyConfig.load(path)


def save_stage_one(tmp_path, kind, classifier="sigmoid_fed"):
    """Instantiate ViTDet's (tiny) stage one, randomise it so that its scores spread, save it with
    detectron2's checkpointer; returns (model, checkpoint path)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import instantiate

    cfg = load(tiny_config(tmp_path, _find(STAGE_ONE[kind]), classifier=classifier))
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    # Spread the scores, with a few classes per RoI above the test threshold (0.02): sigmoid
    # probabilities of zero-mean logits would all pass it, and NMS over RoIs x 1203 candidates is
    # slow on a CPU.
    sigmoid = CLASSIFIERS[classifier].startswith("use_sigmoid_ce=True")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "cls_score.weight" in name:
                p.normal_(0.0, 0.1 if sigmoid else 0.5)
            elif "cls_score.bias" in name:
                p.fill_(0.0)
                p[:-1] = -5.0 if sigmoid else 0.0
            elif "bbox_pred" in name:
                p.normal_(0.0, 0.01)
    model.eval()
    out = tmp_path / f"stage_one_{kind}_{classifier}"
    out.mkdir()
    DetectionCheckpointer(model, str(out)).save("model_final")
    return model, str(out / "model_final.pth")


def stage_two_cfg(tmp_path, kind, init, output_dir="", classifier="sigmoid_fed"):
    base = os.path.join(REPO, "configs", "LVIS", CONFIGS[kind])
    return load(
        tiny_config(tmp_path, base, output_dir=output_dir, init=init, classifier=classifier)
    )


def _inputs(cfg, n=3):
    from detectron2.config import instantiate

    loader = instantiate(cfg.dataloader.test)
    batch = []
    for inputs in loader:
        batch.extend(inputs)
        if len(batch) >= n:
            break
    return batch


def test_use_disalign_swaps_and_keeps_stage_one_arguments():
    from detectron2.config import LazyConfig

    from disalign_det.lazy import use_disalign
    from disalign_det.modeling import DisAlignFastRCNNOutputLayers

    stage_one = LazyConfig.load(_find(STAGE_ONE["cascade"]))
    cfg = LazyConfig.load(os.path.join(REPO, "configs", "LVIS", CONFIGS["cascade"]))
    for a, b in zip(stage_one.model.roi_heads.box_predictors, cfg.model.roi_heads.box_predictors):
        assert b._target_ is DisAlignFastRCNNOutputLayers
        kept = {k for k in a if k not in ("_target_", "get_fed_loss_cls_weights")}
        assert {k: b[k] for k in kept} == {k: a[k] for k in kept}
        assert b.use_sigmoid_ce and b.use_fed_loss and b.cls_loss == "grw" and b.rho == 0.8
    assert "sampler" not in cfg.dataloader.train  # no repeat-factor sampling
    assert cfg.disalign.train_datasets == cfg.dataloader.train.dataset.names
    with pytest.raises(ValueError, match="model.roi_heads.box_predictor._target_"):
        stage_one.model.roi_heads = LazyConfig.load(_find(STAGE_ONE["mask_rcnn"])).model.roi_heads
        stage_one.model.roi_heads.box_predictor._target_ = torch.nn.Linear
        use_disalign(stage_one.model)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_stage_two_configs_use_the_official_schedule_at_vitdets_batch(kind):
    """9k iterations x 16 images, step 8k, warm-up 1k: at ViTDet's 64 images, 2250 / 2000 / 250,
    with the streaming LVIS evaluator at 300 detections per image."""
    from detectron2.config import LazyConfig

    from disalign_det.evaluation import StreamingLVISEvaluator

    cfg = LazyConfig.load(os.path.join(REPO, "configs", "LVIS", CONFIGS[kind]))
    assert cfg.dataloader.train.total_batch_size == 64
    assert cfg.train.max_iter == 2250 and cfg.train.eval_period == 2250
    assert list(cfg.lr_multiplier.scheduler.milestones) == [2000]
    assert list(cfg.lr_multiplier.scheduler["values"]) == [1.0, 0.1]
    assert cfg.lr_multiplier.scheduler.num_updates == 2250
    assert cfg.lr_multiplier.warmup_length * 2250 == pytest.approx(250)
    assert cfg.train.checkpointer.period == 250
    assert cfg.dataloader.evaluator._target_ is StreamingLVISEvaluator
    assert cfg.dataloader.evaluator.max_dets_per_image == 300


def test_missing_project_config_names_the_env_var(monkeypatch):
    from disalign_det.lazy import find_project_config

    monkeypatch.setenv("DETECTRON2_ROOT", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="DETECTRON2_ROOT"):
        find_project_config("LVIS/no_such_config.py")


@pytest.mark.parametrize(
    "kind, classifier",
    [
        ("mask_rcnn", "sigmoid_fed"),
        pytest.param("cascade", "sigmoid_fed", marks=pytest.mark.slow),
        pytest.param("mask_rcnn", "sigmoid", marks=pytest.mark.slow),
        pytest.param("mask_rcnn", "softmax", marks=pytest.mark.slow),
    ],
)
def test_identity_at_init_and_only_calibration_trains(tmp_path, tiny1203, kind, classifier):
    """A stage one saved by the LazyConfig model, loaded into the stage-two config (only the
    calibration missing): the same instances, scores within 1e-6, identical masks."""
    from disalign_det.lazy import build_stage_two_model
    from disalign_det.lazy.train import build_checkpointer
    from disalign_det.modeling import is_calibration_parameter

    stage_one, ckpt = save_stage_one(tmp_path, kind, classifier)
    cfg = stage_two_cfg(tmp_path, kind, ckpt, classifier=classifier)
    model = build_stage_two_model(cfg)
    build_checkpointer(cfg, model).load(ckpt, checkpointables=[])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_calibration_parameter(n) for n in trainable)
    model.eval()
    batch = _inputs(cfg)
    with torch.no_grad():
        ref = stage_one(batch)
        out = model(batch)
    total = 0
    for r, o in zip(ref, out):
        r, o = r["instances"], o["instances"]
        assert len(r) == len(o)
        total += len(r)
        assert torch.equal(r.pred_classes, o.pred_classes)
        assert torch.allclose(r.scores, o.scores, atol=1e-6, rtol=0)
        assert torch.allclose(r.pred_boxes.tensor, o.pred_boxes.tensor, atol=1e-4, rtol=0)
        assert torch.equal(r.pred_masks, o.pred_masks)
    assert total > 0


def test_frozen_vit_drop_path_is_off_in_training(tmp_path, tiny1203):
    from disalign_det.lazy import build_stage_two_model

    cfg = stage_two_cfg(tmp_path, "mask_rcnn", "")
    assert cfg.model.backbone.net.drop_path_rate > 0
    model = build_stage_two_model(cfg)
    model.train()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, b = model.backbone(x), model.backbone(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_one_checkpoint_of_another_model_is_refused(tmp_path, tiny1203):
    from disalign_det.lazy import build_stage_two_model
    from disalign_det.lazy.train import build_checkpointer

    cfg = stage_two_cfg(tmp_path, "mask_rcnn", "")
    model = build_stage_two_model(cfg)
    state = {k: v for k, v in model.state_dict().items() if "mask_head.deconv" not in k}
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lacks"):
        build_checkpointer(cfg, model).load(str(tmp_path / "partial.pth"), checkpointables=[])


@pytest.mark.slow
def test_entry_point_trains_resumes_and_evaluates(tmp_path, tiny1203):
    from disalign_det.evaluation import LVIS_METRICS

    _, ckpt = save_stage_one(tmp_path, "mask_rcnn")
    out = tmp_path / "run"
    config = tiny_config(
        tmp_path,
        os.path.join(REPO, "configs", "LVIS", CONFIGS["mask_rcnn"]),
        output_dir=out,
        init=ckpt,
    )
    tool = load_script("tools/lazyconfig_train_net.py")
    before = torch.load(ckpt, weights_only=False)["model"]

    def run(*argv):
        return tool.main(tool.default_argument_parser().parse_args(list(argv)))

    results = run("--config-file", config)
    for task in ("bbox", "segm"):
        for metric in LVIS_METRICS:
            assert metric in results[task]
            assert torch.isfinite(torch.tensor(results[task][metric])), (task, metric)
    final = torch.load(out / "model_final.pth", weights_only=False)["model"]
    changed = {k for k in final if k in before and not torch.equal(final[k], before[k])}
    assert not changed, changed  # nothing of the stage one moved
    moved = [k for k in final if k not in before and "logit_bias" in k]
    assert moved and any(final[k].abs().sum() > 0 for k in moved)  # gamma trained
    assert (out / "model_0000001.pth").exists() and (out / "last_checkpoint").exists()
    # --eval-only of the result
    res = run(
        "--config-file", config, "--eval-only", f"train.init_checkpoint={out}/model_final.pth"
    )
    assert res["bbox"]["AP"] == pytest.approx(results["bbox"]["AP"], abs=1e-9)
    # --resume continues from the last checkpoint (iteration 2) for one more iteration.
    run("--config-file", config, "--resume", "train.max_iter=4", "train.eval_period=100")
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 3
    with pytest.raises(ValueError, match="train.init_checkpoint"):
        run("--config-file", config, "train.init_checkpoint=", f"train.output_dir={tmp_path}/x")


def _two_process_worker(argv, datasets):
    """Runs in each spawned process: the datasets registered in the test process are not there."""
    from disalign_det.data import register_lvis_format

    for name, json_file, image_root in datasets:
        register_lvis_format(name, json_file, image_root)
    tool = load_script("tools/lazyconfig_train_net.py")
    tool.main(tool.default_argument_parser().parse_args(argv))


@pytest.mark.slow
def test_entry_point_two_cpu_processes(tmp_path, tiny1203):
    from disalign_det.engine import launch
    from disalign_det.evaluation import LVIS_METRICS

    _, ckpt = save_stage_one(tmp_path, "mask_rcnn")
    out = tmp_path / "run2"
    base = os.path.join(REPO, "configs", "LVIS", CONFIGS["mask_rcnn"])
    config = tiny_config(tmp_path, base, output_dir=out, init=ckpt)
    argv = ["--config-file", config, "--num-gpus", "2", "train.max_iter=2"]
    datasets = [(f"tiny1203_{s}", tiny1203[s], tiny1203["image_root"]) for s in ("train", "val")]
    launch(_two_process_worker, 2, args=(argv, datasets))
    with open(out / "metrics_final.json") as f:
        metrics = json.load(f)
    assert all(m in metrics[t] for t in ("bbox", "segm") for m in LVIS_METRICS)
    final = torch.load(out / "model_final.pth", weights_only=False)
    assert len(final["rng_states"]) == 2  # every rank's RNG state, for exact resumes
    before = torch.load(ckpt, weights_only=False)["model"]
    assert all(torch.equal(final["model"][k], v) for k, v in before.items())
