"""``tools/train_net.py`` on the CPU semantic-segmentation configs (configs/ADE20K/synthetic/): a
run SIGKILLed right after a checkpoint and restarted with ``--resume`` ends bit-identical to an
uninterrupted run and trains on the same images at every iteration (stage one; DisAlign stage two,
whose frozen trunk stays exactly the stage one's while its calibration trains), and
``--eval-only`` of the final model reproduces the metrics the training run's final evaluation
wrote. The data is a tiny stand-in for ``sem_seg_synth_lt`` (same names, layout and 61 classes)."""

import disalign_det  # noqa: F401  isort:skip

import json
import os

import numpy as np
import pytest
import torch
from common import REPO
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from PIL import Image
from resume_harness import check_resume_is_exact

from disalign_det import add_disalign_config
from disalign_det.data import sem_seg_synth
from disalign_det.engine import DisAlignCheckpointer
from tools import train_net as tn

SYNTH = os.path.join(REPO, "configs", "ADE20K", "synthetic")
STAGE_ONE = os.path.join(SYNTH, "semantic_fpn_synth.yaml")
STAGE_TWO = os.path.join(SYNTH, "disalign_semantic_fpn_synth.yaml")
NUM_CLASSES = len(sem_seg_synth.sem_seg_synth_classes())
# 4 iterations of 2 images, a checkpoint every 2 (the kill comes right after the first one).
TINY = [
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "4",
    "SOLVER.STEPS", "(3,)",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "INPUT.MIN_SIZE_TRAIN", "(48,)",
    "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "48",
    "INPUT.MAX_SIZE_TEST", "64",
    "TEST.EVAL_PERIOD", "0",
]  # fmt: skip


def _write_split(folder, n, rng):
    """``n`` 48 x 64 images: class-0 background and two rectangles of classes 1..60, each painted
    in a colour of its class plus noise (labels and pixels agree, so the model has something to
    learn)."""
    palette = np.random.default_rng(7).integers(0, 255, size=(NUM_CLASSES, 3))
    os.makedirs(os.path.join(folder[0]), exist_ok=True)
    os.makedirs(os.path.join(folder[1]), exist_ok=True)
    for k in range(n):
        label = np.zeros((48, 64), dtype=np.uint8)
        for _ in range(2):
            y, x = rng.integers(0, 28), rng.integers(0, 40)
            label[y : y + 20, x : x + 24] = rng.integers(1, NUM_CLASSES)
        pixels = palette[label] + rng.normal(0, 8, size=(48, 64, 3))
        stem = f"{k + 1:06d}"
        img = np.clip(pixels, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder[0], stem + ".jpg"), quality=95)
        Image.fromarray(label).save(os.path.join(folder[1], stem + ".png"))


def _register(root):
    for name in sem_seg_synth.SEM_SEG_SYNTH_DATASETS:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    sem_seg_synth.register_sem_seg_synth(root)


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory):
    """``$ROOT/sem_seg_synth_lt`` with 8 train and 4 val images, stamped as the current generated
    dataset (so the built-in loader reads it as it is); the built-in names point at it, in this
    process and (``DETECTRON2_DATASETS``) in the child processes, and the pixel counts are cached
    under the temporary folder."""
    root = str(tmp_path_factory.mktemp("sem_seg_synth_root"))
    out = os.path.join(root, sem_seg_synth.SEM_SEG_SYNTH_SUBDIR)
    rng = np.random.default_rng(0)
    for split, n in (("training", 8), ("validation", 4)):
        folders = (os.path.join(out, "images", split), os.path.join(out, "annotations", split))
        _write_split(folders, n, rng)
    with open(os.path.join(out, sem_seg_synth.STAMP), "w") as f:
        json.dump(sem_seg_synth._expected({}), f)
    env = {"DETECTRON2_DATASETS": root, "DISALIGN_CACHE_DIR": os.path.join(root, "cache")}
    old_env = {k: os.environ.get(k) for k in env}
    old_root = os.path.abspath(sem_seg_synth.datasets_root())
    os.environ.update(env)
    _register(root)
    yield root
    for k, v in old_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _register(old_root)


def _config_file(tmp_path, config, opts=()):
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list([*TINY, *opts])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.dump())
    return str(path)


def _final_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics_final.json")) as f:
        return json.load(f)


def _check_eval_only(tmp_path, config_file, output_dir):
    """``--eval-only`` of ``output_dir``'s final model: the same numbers as its training run's
    final evaluation (metrics_final.json), every metric, exactly."""
    written = _final_metrics(output_dir)
    args = tn.default_argument_parser().parse_args(
        ["--config-file", config_file, "--eval-only", "OUTPUT_DIR", str(tmp_path / "eval_only"),
         "MODEL.WEIGHTS", os.path.join(output_dir, "model_final.pth")]
    )  # fmt: skip
    torch.set_num_threads(2)  # as the training run's evaluation (_in_process_run)
    res = json.loads(json.dumps(tn.main(args)))
    assert set(written["sem_seg"]) >= {"mIoU", "mIoU-head", "mIoU-body", "mIoU-tail", "mACC"}
    assert res == written
    return written


def _check_batches(batches, max_iter):
    # The killed and resumed runs together trained on exactly the uninterrupted run's images.
    assert {**batches["killed"], **batches["resumed"]} == batches["full"]
    ids = [i for b in batches["full"].values() for i in b]
    assert len(ids) == 2 * max_iter and all(isinstance(i, int) for i in ids)


@pytest.mark.slow
def test_sem_seg_stage_one_resumes_exactly_and_eval_only_reproduces(tiny_synth, tmp_path):
    config = _config_file(tmp_path, STAGE_ONE)
    final, batches, _ = check_resume_is_exact(tmp_path, config, max_iter=4, period=2)
    _check_batches(batches, 4)
    # The resumed run's final evaluation equals the uninterrupted one's, and --eval-only of the
    # final model reproduces it.
    full, resumed = str(tmp_path / "full"), str(tmp_path / "killed")
    assert _final_metrics(resumed) == _final_metrics(full)
    _check_eval_only(tmp_path, config, full)
    assert "sem_seg_head.predictor.weight" in final


@pytest.fixture(scope="module")
def stage_one_weights(tiny_synth, tmp_path_factory):
    """A stock stage-one Semantic FPN of the CPU config (random weights, BatchNorm statistics
    moved off their defaults so a stage two that updated them would show)."""
    out = str(tmp_path_factory.mktemp("sem_seg_stage_one"))
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.merge_from_file(STAGE_ONE)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.9, 1.1)
    DisAlignCheckpointer(model, out).save("stage1")
    return os.path.join(out, "stage1.pth")


@pytest.mark.slow
def test_sem_seg_stage_two_resume_keeps_frozen_trunk_and_calibration(
    tiny_synth, stage_one_weights, tmp_path
):
    opts = ["MODEL.WEIGHTS", stage_one_weights, "SOLVER.BASE_LR", "0.5"]
    config = _config_file(tmp_path, STAGE_TWO, opts)
    final, batches, _ = check_resume_is_exact(tmp_path, config, max_iter=4, period=2)
    _check_batches(batches, 4)
    # Identical to the uninterrupted run (checked above), and that run froze everything but the
    # calibration: every stage-one tensor, BatchNorm statistics included, is bit-identical.
    stage_one = torch.load(stage_one_weights, weights_only=True)["model"]
    calibration = {k for k in final if k not in stage_one}
    assert calibration == {
        "sem_seg_head.predictor.logit_scale",
        "sem_seg_head.predictor.logit_bias",
        "sem_seg_head.predictor.confidence_layer.weight",
        "sem_seg_head.predictor.confidence_layer.bias",
    }
    for k, v in stage_one.items():
        assert torch.equal(final[k], v), k
    # ... while the calibration trained away from its identity start (beta 1, gamma 0).
    beta = final["sem_seg_head.predictor.logit_scale"]
    gamma = final["sem_seg_head.predictor.logit_bias"]
    assert beta.shape == gamma.shape == (NUM_CLASSES,)
    assert not torch.equal(beta, torch.ones_like(beta))
    assert not torch.equal(gamma, torch.zeros_like(gamma))
    full, resumed = str(tmp_path / "full"), str(tmp_path / "killed")
    assert _final_metrics(resumed) == _final_metrics(full)
    _check_eval_only(tmp_path, config, full)
