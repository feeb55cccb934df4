"""Interrupted runs resume exactly, on both entry points: a ``tools/train_net.py`` (YAML) or
``tools/lazyconfig_train_net.py`` (LazyConfig) process SIGKILLed right after a checkpoint, or (with
2 data-loader workers and images of both orientations) at a random iteration between checkpoints,
restarted with ``--resume``, ends bit-identical to an uninterrupted run and trains on the same
images at every iteration (stage one and stage two); a save that fails half-way leaves the previous
checkpoint and ``last_checkpoint`` intact."""

import disalign_det  # noqa: F401  isort:skip

import json
import os
import random

import numpy as np
import pytest
import torch
from conftest import TINY_CLASSES, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from PIL import Image
from resume_harness import PATHS, check_resume_is_exact

from disalign_det.data import generate_synthetic_lvis
from disalign_det.engine import DisAlignCheckpointer


def _config_file(tmp_path, tiny_dataset, config, opts, name="tiny_train"):
    """A tiny config file that registers the tiny dataset itself (for the child process)."""
    lvis_format = repr((((name, tiny_dataset["train_json"], tiny_dataset["image_root"])),))
    opts = ["DATASETS.LVIS_FORMAT", lvis_format, "DATASETS.TRAIN", repr((name,)), *opts]
    cfg = tiny_cfg(config, "", opts)
    path = tmp_path / "config.yaml"
    path.write_text(cfg.dump())
    return str(path)


def _lazy_config_file(tmp_path, dataset, config, opts, name="tiny_train", sampler="none"):
    """A LazyConfig file training the model of the tiny YAML ``config`` (+ ``opts``) through the
    LazyConfig path: its model and mapper built from that YAML config, everything else (data
    loader, optimizer, schedule, ``train``, ``disalign``) written as LazyConfig nodes; it registers
    the dataset itself (for the child process). ``sampler``: "none" (detectron2's default
    TrainingSampler) or "rfs" (repeat-factor sampling)."""
    yaml_file = _config_file(tmp_path, dataset, config, opts, name=name)
    cfg = tiny_cfg(config, "", ["DATASETS.TRAIN", repr((name,)), *opts])
    text = f"""
from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.modeling import build_model
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf
import torch

from disalign_det.config import get_inference_cfg
from disalign_det.data import register_lvis_format

register_lvis_format({name!r}, {dataset["train_json"]!r}, {dataset["image_root"]!r})
_cfg = L(get_inference_cfg)(config_file={yaml_file!r})
model = L(build_model)(cfg=_cfg)
_dataset = L(get_detection_dataset_dicts)(names={name!r})
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=_dataset,
    mapper=L(DatasetMapper)(cfg=_cfg, is_train=True),
    total_batch_size={cfg.SOLVER.IMS_PER_BATCH},
    num_workers={cfg.DATALOADER.NUM_WORKERS},
)
if {sampler!r} == "rfs":
    dataloader.train.sampler = L(RepeatFactorTrainingSampler)(
        repeat_factors=L(RepeatFactorTrainingSampler.repeat_factors_from_category_frequency)(
            dataset_dicts=_dataset, repeat_thresh={cfg.DATALOADER.REPEAT_THRESHOLD}
        )
    )
optimizer = L(torch.optim.SGD)(
    params=L(get_default_optimizer_params)(), lr={cfg.SOLVER.BASE_LR}, momentum=0.9
)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1], milestones=[{cfg.SOLVER.MAX_ITER - 1}], num_updates={cfg.SOLVER.MAX_ITER}
    ),
    warmup_length=0.25,
    warmup_factor=0.1,
)
train = dict(
    output_dir="",
    init_checkpoint={cfg.MODEL.WEIGHTS!r},
    max_iter={cfg.SOLVER.MAX_ITER},
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period={cfg.SOLVER.CHECKPOINT_PERIOD}, max_to_keep=100),
    eval_period=0,
    log_period=20,
    device="cpu",
    seed={cfg.SEED},  # as SEED in the YAML configs: the data stream's seed (exact resumes)
)
if {cfg.MODEL.DISALIGN.FREEZE!r} != "none":
    disalign = dict(freeze={cfg.MODEL.DISALIGN.FREEZE!r}, train_datasets={name!r})
"""
    path = tmp_path / "config.py"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def stage_one_weights(tiny_dataset, tmp_path_factory):
    return save_stage_one(str(tmp_path_factory.mktemp("resume_stage1")))


def save_stage_one(out):
    """A tiny stage one (classifier spread so that scores differ) saved as ``out/stage1.pth``."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(std=0.05)
    DetectionCheckpointer(model, out).save("stage1")
    return os.path.join(out, "stage1.pth")


def _config(path, tmp_path, dataset, config, opts, name="tiny_train", sampler="none"):
    if path == "yaml":
        return _config_file(tmp_path, dataset, config, opts, name=name)
    return _lazy_config_file(tmp_path, dataset, config, opts, name=name, sampler=sampler)


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(PATHS))
def test_stage_two_resumes_bit_identical(tiny_dataset, stage_one_weights, tmp_path, path):
    # The default horizontal flip draws from numpy and the 32 sampled RoIs per image from torch,
    # so both RNG streams must continue exactly where the killed run stopped.
    opts = [
        "MODEL.WEIGHTS", stage_one_weights,
        "SOLVER.BASE_LR", "0.5",
        "SOLVER.MAX_ITER", "4",
        "SOLVER.CHECKPOINT_PERIOD", "2",
    ]  # fmt: skip
    config = _config(path, tmp_path, tiny_dataset, "synthetic/disalign_synth.yaml", opts)
    final, _, _ = check_resume_is_exact(tmp_path, config, max_iter=4, period=2, path=path)
    # Stage two did train the calibration in those iterations.
    assert not torch.equal(
        final["roi_heads.box_predictor.logit_scale"],
        torch.ones_like(final["roi_heads.box_predictor.logit_scale"]),
    )


@pytest.mark.slow
def test_stage_one_resumes_bit_identical(tiny_dataset, tmp_path):
    # Killed after the first iteration: the second one needs the restored momentum, BatchNorm
    # statistics, RNG states and data position to match.
    opts = ["SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1"]
    config = _config_file(tmp_path, tiny_dataset, "synthetic/mask_rcnn_synth.yaml", opts)
    check_resume_is_exact(tmp_path, config, max_iter=2, period=1)


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory):
    """A tiny generated LVIS-format train split with both orientations: a third of the images
    padded to landscape (80 x 64), a third to portrait (64 x 80), a third left square (detectron2
    groups those with portrait). The padding is at the right / bottom, so annotations still fit."""
    out = str(tmp_path_factory.mktemp("mixed_lvis"))
    paths = generate_synthetic_lvis(
        out, seed=1, num_classes=TINY_CLASSES, num_train_images=30, num_val_images=12, image_size=64
    )
    with open(paths["train_json"]) as f:
        data = json.load(f)
    for k, img in enumerate(data["images"]):
        if k % 3 == 2:
            continue
        path = os.path.join(paths["image_root"], "train2017", os.path.basename(img["coco_url"]))
        pixels = np.asarray(Image.open(path).convert("RGB"))
        pad = ((0, 0), (0, 16)) if k % 3 == 0 else ((0, 16), (0, 0))
        pixels = np.pad(pixels, pad + ((0, 0),))
        Image.fromarray(pixels).save(path, quality=95)
        img["height"], img["width"] = pixels.shape[:2]
    with open(paths["train_json"], "w") as f:
        json.dump(data, f)
    paths["orientation"] = {img["id"]: img["width"] > img["height"] for img in data["images"]}
    return paths


def _waiting_at(trainer, iterations):
    """For each batch boundary in ``iterations``: whether an image of this run's index stream waits
    in an orientation bucket there (what detectron2's grouping loses on resume)."""
    bs = trainer.data_loader.batch_sampler
    buckets, n, ret = {}, 0, {}
    for idx in bs.sampler:
        g = int(bs.group_ids[idx])
        buckets[g] = buckets.get(g, 0) + 1
        if buckets[g] == bs.batch_size:
            buckets[g], n = 0, n + 1
            if n in iterations:
                ret[n] = sum(buckets.values()) > 0
            if n >= max(iterations):
                return ret


def _check_mixed_resume(tmp_path, mixed_dataset, config, opts, period=3, path="yaml"):
    """With 2 data-loader workers, kill at a random iteration strictly between two checkpoints,
    the first of which has an image waiting in an orientation bucket; weights, optimizer and
    per-iteration image ids must match the uninterrupted run."""
    max_iter = 3 * period
    opts = [
        *opts,
        "DATALOADER.NUM_WORKERS", "2",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD", str(period),
    ]  # fmt: skip
    sampler = "rfs" if config.endswith("_rfs.yaml") else "none"
    config = _config(path, tmp_path, mixed_dataset, config, opts, "mixed_train", sampler)

    def kill_after(trainer):
        # Checkpoints after iterations period - 1 and 2 * period - 1: resuming from one starts
        # with batch period or 2 * period.
        waiting = _waiting_at(trainer, {period, 2 * period})
        starts = [n for n, w in sorted(waiting.items()) if w]
        assert starts, f"no image waits at a checkpoint ({waiting}): choose another SEED"
        start = random.choice(starts)
        return random.randint(start, start + period - 2)

    final, batches, killed_at = check_resume_is_exact(
        tmp_path, config, max_iter, period, kill_after=kill_after, path=path
    )
    full = batches["full"]
    msg = f"killed after iteration {killed_at}"
    assert {**batches["killed"], **batches["resumed"]} == full, msg
    assert {i: full[i] for i in batches["killed"]} == batches["killed"], msg
    # Full batches of one orientation, both orientations trained on.
    orientation = mixed_dataset["orientation"]
    assert all(len(ids) == 2 and len({orientation[i] for i in ids}) == 1 for ids in full.values())
    assert {orientation[ids[0]] for ids in full.values()} == {True, False}
    return final


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(PATHS))
def test_stage_one_resumes_exactly_with_workers_and_both_orientations(
    mixed_dataset, tmp_path, path
):
    # Repeat-factor sampling: its stream (stochastic rounding per epoch) must replay too.
    config = "synthetic/mask_rcnn_synth_rfs.yaml"
    _check_mixed_resume(tmp_path, mixed_dataset, config, [], path=path)


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(PATHS))
def test_stage_two_resumes_exactly_with_workers_and_both_orientations(
    mixed_dataset, stage_one_weights, tmp_path, path
):
    opts = ["MODEL.WEIGHTS", stage_one_weights, "SOLVER.BASE_LR", "0.5"]
    config = "synthetic/disalign_synth.yaml"
    final = _check_mixed_resume(tmp_path, mixed_dataset, config, opts, path=path)
    assert not torch.equal(
        final["roi_heads.box_predictor.logit_scale"],
        torch.ones_like(final["roi_heads.box_predictor.logit_scale"]),
    )


def _failing_save(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 the first bytes of a zip archive")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("name", ["model_0000005", "model_final"])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, name):
    model = torch.nn.Linear(3, 2)
    checkpointer = DisAlignCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000002")
    checkpointer.save("model_final")
    checkpointer.tag_last_checkpoint("model_0000002.pth")
    files = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(OSError, match="No space left on device"):
        checkpointer.save(name)
    monkeypatch.undo()

    # Same files, same bytes: no partial target, no temporary file, last_checkpoint untouched.
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == files
    assert files["last_checkpoint"] == b"model_0000002.pth"
    restored = torch.nn.Linear(3, 2)
    DisAlignCheckpointer(restored, str(tmp_path)).resume_or_load("", resume=True)
    for k, v in restored.state_dict().items():
        assert torch.equal(v, saved[k]), k
