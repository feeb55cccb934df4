"""Bad input fails with an error that names the key or the file, before anything is overwritten:
dataset files, LVIS json contents, class counts, checkpoints, rho, freezing, images, non-finite
losses, missing stage-one weights and unknown config keys."""

import disalign_det  # noqa: F401  isort:skip

import json
import logging
import os
import re
import shutil
import uuid

import pytest
import torch
from conftest import CONFIGS, TINY_CLASSES, load_script, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from disalign_det.data import LVISFormatError, check_num_classes, register_lvis_format
from disalign_det.engine import DisAlignCheckpointer, Trainer
from disalign_det.modeling import install_class_weights, is_calibration_parameter

STAGE_TWO = "synthetic/disalign_synth.yaml"
README = re.escape("See datasets/README.md")


def _uniq(prefix):
    # DatasetCatalog is process-global: every test registers fresh names.
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _setup(tmp_path, config=STAGE_TWO, opts=(), resume=False):
    """tools/train_net.py's setup() on a tiny config file (tiny_train is registered in-process)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_cfg(config, str(tmp_path / "out")).dump())
    tn = load_script("tools/train_net.py")
    argv = ["--config-file", str(path), *(["--resume"] if resume else []), *opts]
    return tn.setup(tn.default_argument_parser().parse_args(argv))


def _tiny_json(tiny_dataset):
    with open(tiny_dataset["train_json"]) as f:
        return json.load(f)


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


@pytest.fixture(scope="module")
def stage_one(tiny_dataset, tmp_path_factory):
    """A stage-one checkpoint of the tiny config (random weights are enough to load)."""
    out = str(tmp_path_factory.mktemp("errors_stage1"))
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(tiny_cfg()), out).save("stage1")
    return os.path.join(out, "stage1.pth")


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


def test_missing_dataset_files_point_to_the_readme(tiny_dataset, tmp_path):
    missing = str(tmp_path / "lvis_v1_train.json")
    name = _uniq("missing")
    with pytest.raises(
        FileNotFoundError,
        match=rf"LVIS-format json of dataset '{name}' not found: '{re.escape(missing)}'\. {README}",
    ):
        register_lvis_format(name, missing, tiny_dataset["image_root"])
    no_root = str(tmp_path / "images")
    with pytest.raises(
        FileNotFoundError,
        match=rf"Image root of dataset '{name}' not found: '{re.escape(no_root)}'\. {README}",
    ):
        register_lvis_format(name, tiny_dataset["train_json"], no_root)


def test_train_net_setup_missing_dataset_file_keeps_output_dir(tiny_dataset, tmp_path):
    # An earlier run's config in OUTPUT_DIR must survive a failing setup.
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("the earlier run's config\n")
    missing = str(tmp_path / "gone.json")
    name = _uniq("gone")
    entry = repr(((name, missing, tiny_dataset["image_root"]),))
    with pytest.raises(
        FileNotFoundError,
        match=rf"LVIS-format json of dataset '{name}' not found: '{re.escape(missing)}'\. {README}",
    ):
        _setup(tmp_path, opts=["DATASETS.LVIS_FORMAT", entry, "DATASETS.TRAIN", f"('{name}',)"])
    assert os.listdir(out) == ["config.yaml"]
    assert (out / "config.yaml").read_text() == "the earlier run's config\n"


def test_lvis_json_missing_required_field(tiny_dataset, tmp_path):
    data = _tiny_json(tiny_dataset)
    del data["images"][3]["coco_url"]
    path = _write_json(tmp_path / "no_url.json", data)
    image_id = data["images"][3]["id"]
    with pytest.raises(
        LVISFormatError,
        match=re.escape(
            f"{path}: images[3] (id={image_id}) lacks required field(s) ['coco_url']; every entry "
            "of 'images' needs ['id', 'width', 'height', 'coco_url']"
        ),
    ):
        register_lvis_format(_uniq("no_url"), path, tiny_dataset["image_root"])


def test_category_ids_not_matching_annotations(tiny_dataset, tmp_path):
    data = _tiny_json(tiny_dataset)
    data["annotations"][5]["category_id"] = 99
    path = _write_json(tmp_path / "bad_cat.json", data)
    ann_id = data["annotations"][5]["id"]
    with pytest.raises(
        LVISFormatError,
        match=re.escape(
            f"{path}: annotations[5] (id={ann_id}) has category_id 99, which is not among the "
            f"{TINY_CLASSES} categories"
        ),
    ):
        register_lvis_format(_uniq("bad_cat"), path, tiny_dataset["image_root"])
    # Category ids must be 1..K: the loader maps id -> id - 1.
    data = _tiny_json(tiny_dataset)
    data["categories"][-1]["id"] = 40
    path = _write_json(tmp_path / "gap.json", data)
    with pytest.raises(
        LVISFormatError, match=re.escape(f"{path}: category ids must be contiguous")
    ):
        register_lvis_format(_uniq("gap"), path, tiny_dataset["image_root"])


def test_num_classes_differs_from_dataset(tiny_dataset, tmp_path):
    message = re.escape(
        "MODEL.ROI_HEADS.NUM_CLASSES=5 but dataset 'tiny_train' (DATASETS.TRAIN) has 6 classes; "
        "set MODEL.ROI_HEADS.NUM_CLASSES 6"
    )
    with pytest.raises(ValueError, match=message):
        check_num_classes(tiny_cfg(opts=["MODEL.ROI_HEADS.NUM_CLASSES", "5"]))
    with pytest.raises(ValueError, match=message):
        _setup(tmp_path, opts=["MODEL.ROI_HEADS.NUM_CLASSES", "5", "MODEL.WEIGHTS", "x.pth"])
    assert not (tmp_path / "out").exists()  # default_setup (config.yaml, logs) did not run


def test_class_without_training_samples_warns_and_keeps_weights_finite(
    tiny_dataset, tmp_path, caplog
):
    # Class id 2 (contiguous 1) has no training annotation at all.
    data = _tiny_json(tiny_dataset)
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 2]
    for c in data["categories"]:
        if c["id"] == 2:
            c["image_count"] = c["instance_count"] = 0
    name = _uniq("zero")
    register_lvis_format(
        name, _write_json(tmp_path / "zero.json", data), tiny_dataset["image_root"]
    )
    cfg = tiny_cfg(STAGE_TWO, opts=["DATASETS.TRAIN", f"('{name}',)"])
    with caplog.at_level(logging.WARNING, logger="disalign_det"):
        model = Trainer.build_model(cfg)
        install_class_weights(model, cfg)  # what Trainer does when training starts
    warnings = [r.getMessage() for r in caplog.records if "zero training samples" in r.getMessage()]
    assert warnings and all(
        re.search(r"1 class\(es\) have zero training samples \(contiguous ids \[1\]\); their "
                  r"count is clamped to 2 ", w)
        for w in warnings
    ), warnings  # fmt: skip
    for head in (model.roi_heads.box_predictor, model.roi_heads.mask_head):
        w = head.class_weights
        assert w.shape == (TINY_CLASSES + 1,) and torch.isfinite(w).all() and (w > 0).all()
        # The empty class is weighted like the rarest class (2 instances), not infinitely.
        assert w[1] == w[4] == w[:TINY_CLASSES].max()


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def test_stage_one_checkpoint_with_other_class_count(stage_one):
    cfg = tiny_cfg(STAGE_TWO, opts=["MODEL.ROI_HEADS.NUM_CLASSES", "7"])
    cfg.DATASETS.TRAIN = ()
    cfg.MODEL.DISALIGN.CLS_LOSS = "ce"
    cfg.MODEL.DISALIGN.MASK_LOSS = "bce"
    model = Trainer.build_model(cfg)
    with pytest.raises(ValueError) as e:
        DisAlignCheckpointer(model, strict_stage_one=True).load(stage_one)
    msg = str(e.value)
    # cls_score, bbox_pred and the mask predictor, weight and bias each.
    assert msg.startswith("The checkpoint does not fit this model (6 shape mismatch(es)):\n")
    assert (
        "  roi_heads.box_predictor.cls_score.weight: checkpoint (7, 256), model (8, 256)\n" in msg
    )
    assert (
        "  roi_heads.box_predictor.bbox_pred.weight: checkpoint (24, 256), model (28, 256)\n" in msg
    )
    assert "  roi_heads.mask_head.predictor.bias: checkpoint (6,), model (7,)\n" in msg
    assert msg.endswith(
        "set MODEL.ROI_HEADS.NUM_CLASSES to the stage-one value, or load the right MODEL.WEIGHTS."
    )


def test_stage_one_checkpoint_of_another_architecture(tiny_dataset, tmp_path):
    # A stage one with a single fc in the box head: every shape that exists matches, fc2 is missing.
    other = build_model(tiny_cfg(opts=["MODEL.ROI_BOX_HEAD.NUM_FC", "1"]))
    DetectionCheckpointer(other, str(tmp_path)).save("one_fc")
    model = Trainer.build_model(tiny_cfg(STAGE_TWO))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "The checkpoint lacks 2 parameter(s) of this model that stage two freezes (e.g. "
            "['roi_heads.box_head.fc2.weight', 'roi_heads.box_head.fc2.bias']): it is not a "
            "checkpoint of this architecture. Check MODEL.WEIGHTS and the stage-one config "
            "(_BASE_)."
        ),
    ):
        DisAlignCheckpointer(model, strict_stage_one=True).load(str(tmp_path / "one_fc.pth"))


def test_truncated_or_corrupt_checkpoint_names_the_file(stage_one, tmp_path):
    data = open(stage_one, "rb").read()
    truncated = tmp_path / "model_0000009.pth"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    model = Trainer.build_model(tiny_cfg(STAGE_TWO))

    def fails_naming(path):
        return pytest.raises(
            RuntimeError,
            match=re.escape(f"Cannot read checkpoint '{path}': the file is truncated, corrupt or "
                            "not a checkpoint ("),
        )  # fmt: skip

    for path in (truncated, garbage):
        with fails_naming(path):
            DisAlignCheckpointer(model, strict_stage_one=True).load(str(path))
    # The same when resuming from last_checkpoint.
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    with fails_naming(truncated):
        DisAlignCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def test_rho_negative_or_not_a_number(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match=re.escape("MODEL.DISALIGN.RHO must be >= 0, got -0.5")):
        Trainer.build_model(tiny_cfg(STAGE_TWO, opts=["MODEL.DISALIGN.RHO", "-0.5"]))
    # NaN from a config file: yaml's .nan is a float, so only the model can reject it.
    config = tmp_path / "nan_rho.yaml"
    config.write_text(f'_BASE_: "{os.path.join(CONFIGS, STAGE_TWO)}"\nMODEL:\n  DISALIGN:\n'
                      "    RHO: .nan\n")  # fmt: skip
    with pytest.raises(
        ValueError, match=re.escape("MODEL.DISALIGN.RHO must be a finite number >= 0, got nan")
    ):
        Trainer.build_model(tiny_cfg(str(config)))
    # Not a number on the command line: the config system rejects it, naming the key.
    with pytest.raises(ValueError, match=r"Type mismatch .* for config key: MODEL\.DISALIGN\.RHO"):
        tiny_cfg(STAGE_TWO, opts=["MODEL.DISALIGN.RHO", "high"])


def test_config_leaving_nothing_trainable(tiny_dataset, stage_one, tmp_path):
    out = tmp_path / "out"
    opts = [
        "MODEL.WEIGHTS", stage_one,
        "MODEL.DISALIGN.BOX_CALIBRATION", "False",
        "MODEL.DISALIGN.MASK_CALIBRATION", "False",
    ]  # fmt: skip
    with pytest.raises(
        ValueError,
        match=re.escape(
            "MODEL.DISALIGN.FREEZE='all_but_calibration' leaves nothing to train: the model has no "
            "calibration parameters."
        ),
    ):
        Trainer(tiny_cfg(STAGE_TWO, str(out), opts))
    assert not out.exists()


def test_stage_two_without_weights_names_model_weights(tiny_dataset, tmp_path):
    message = re.escape(
        "MODEL.DISALIGN.FREEZE='all_but_calibration' (stage two) needs the stage-one checkpoint: "
        "add MODEL.WEIGHTS path/to/stage_one/model_final.pth"
    )
    with pytest.raises(ValueError, match=message + "$"):
        _setup(tmp_path)
    # --resume without a checkpoint to resume from would silently start from random weights.
    out = re.escape(repr(str(tmp_path / "out")))
    with pytest.raises(
        ValueError, match=message + rf" \(--resume found no last_checkpoint in OUTPUT_DIR {out}\)"
    ):
        _setup(tmp_path, resume=True)


def test_unknown_config_key_fails_naming_it(tiny_dataset, tmp_path):
    # As in detectron2 (yacs): an AssertionError on the command line, a KeyError in a file.
    with pytest.raises(AssertionError, match="^Non-existent key: MODEL.DISALIGN.RH0$"):
        _setup(tmp_path, opts=["MODEL.DISALIGN.RH0", "0.5"])
    config = tmp_path / "typo.yaml"
    config.write_text(f'_BASE_: "{os.path.join(CONFIGS, STAGE_TWO)}"\nSOLVER:\n  BASE_LRR: 0.1\n')
    with pytest.raises(KeyError, match="'Non-existent config key: SOLVER.BASE_LRR'"):
        tiny_cfg(str(config))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def test_undecodable_image_is_named(tiny_dataset, tmp_path):
    # Two training images; the second file is cut short.
    data = _tiny_json(tiny_dataset)
    keep = [im["id"] for im in data["images"][:2]]
    data["images"] = data["images"][:2]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    root = tmp_path / "images"
    for im in data["images"]:
        rel = "/".join(im["coco_url"].split("/")[-2:])
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(tiny_dataset["image_root"], rel), root / rel)
    broken = str(root / "/".join(data["images"][1]["coco_url"].split("/")[-2:]))
    with open(broken, "rb") as f:
        head = f.read(300)
    with open(broken, "wb") as f:
        f.write(head)
    name = _uniq("broken")
    register_lvis_format(name, _write_json(tmp_path / "broken.json", data), str(root) + os.sep)
    cfg = tiny_cfg(opts=["DATASETS.TRAIN", f"('{name}',)"])
    message = re.escape(f"Cannot load image '{broken}' (image_id={keep[1]}): OSError: ")
    with pytest.raises(RuntimeError, match=message):
        next(iter(Trainer.build_train_loader(cfg)))
    with pytest.raises(RuntimeError, match=message):
        list(Trainer.build_test_loader(cfg, name))


@pytest.mark.slow
def test_non_finite_loss_names_iteration_and_loss(stage_one, tmp_path):
    out = tmp_path / "out"
    opts = ["MODEL.WEIGHTS", stage_one, "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.MAX_ITER", "3"]
    trainer = Trainer(tiny_cfg(STAGE_TWO, str(out), opts))
    trainer.resume_or_load(resume=False)
    model = trainer.model
    forward = model.forward

    def nan_mask_loss_at_iteration_1(batched_inputs):
        losses = forward(batched_inputs)
        if trainer.iter == 1:
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
        return losses

    model.forward = nan_mask_loss_at_iteration_1
    with pytest.raises(
        FloatingPointError,
        match=r"^Loss became infinite or NaN at iteration=1: loss_mask=nan \(all losses: "
        r"\{'loss_cls': [0-9.]+, 'loss_mask': nan\}\)\. The optimizer step was skipped",
    ):
        trainer.train()
    # Nothing lost: the checkpoint of iteration 0 is the last one, and the model still holds it
    # (the step of iteration 1 was not applied).
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == ["model_0000000.pth"]
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"
    saved = torch.load(out / "model_0000000.pth", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        if is_calibration_parameter(k):
            assert torch.equal(v, saved[k]), k
            assert torch.isfinite(v).all(), k
