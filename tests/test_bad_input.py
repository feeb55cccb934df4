"""Catalogue of bad input (docs/errors.md): annotation values, image files, the val side,
checkpoints for inference, config values and run folders.

Each case asserts the named error (or the logged drop count) and, where a tool runs, that an
existing run folder is byte-for-byte unchanged (hash of every file before and after).
"""

import disalign_det  # noqa: F401  isort:skip

import hashlib
import json
import logging
import math
import os
import re
import uuid

import numpy as np
import pytest
import torch
from conftest import TINY_CLASSES, load_script, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from disalign_det import add_disalign_config
from disalign_det.data import (
    check_num_classes,
    class_counts_from_cfg,
    frequency_bucket,
    register_datasets_from_cfg,
    register_lvis_format,
)
from disalign_det.data.dataset_checks import fill_missing_frequency
from disalign_det.data.validate import (
    BORDER_TOLERANCE,
    ImageFilesError,
    LVISValueError,
    check_image_files,
    find_invalid_annotations,
)
from disalign_det.engine import DisAlignCheckpointer, DisAlignPredictor, Trainer
from disalign_det.engine.run_folder import remove_stale_temporaries
from disalign_det.engine.strict_load import LAZY_KEYS, InferenceCheckpointer, load_for_inference
from disalign_det.modeling.freeze import DISALIGN_BUFFER_NAMES
from lab.plan import POSTHOC_DELTA

STAGE_ONE = "synthetic/mask_rcnn_synth.yaml"
STAGE_TWO = "synthetic/disalign_synth.yaml"


def _uniq(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _load(path):
    with open(path) as f:
        return json.load(f)


def _write(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def _edited(tiny_dataset, tmp_path, edit, split="train"):
    """A copy of the tiny ``split`` json with ``edit(data)`` applied; returns (path, data)."""
    data = _load(tiny_dataset[f"{split}_json"])
    edit(data)
    return _write(tmp_path / f"{split}_{uuid.uuid4().hex[:6]}.json", data), data


def _folder_hash(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def run_folder(tmp_path):
    """A finished run's OUTPUT_DIR: config, weights, last_checkpoint, metrics."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("the earlier run's config\n")
    (out / "model_final.pth").write_bytes(b"earlier weights")
    (out / "last_checkpoint").write_text("model_final.pth")
    (out / "metrics_final.json").write_text('{"bbox": {"AP": 1.0}}')
    return out


@pytest.fixture(scope="module")
def stage_one(tiny_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bad_input_ckpt"))
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(tiny_cfg()), out).save("stage1")
    return os.path.join(out, "stage1.pth")


@pytest.fixture(scope="module")
def disalign_ckpt(tiny_dataset, stage_one, tmp_path_factory):
    """A DisAlign (stage-two) checkpoint of the tiny config: stage one + calibration."""
    out = str(tmp_path_factory.mktemp("bad_input_da"))
    model = Trainer.build_model(tiny_cfg(STAGE_TWO))
    DisAlignCheckpointer(model, strict_stage_one=True).load(stage_one)
    DetectionCheckpointer(model, out).save("disalign")
    return os.path.join(out, "disalign.pth")


def _train_net(tmp_path, config=STAGE_ONE, opts=(), resume=False, eval_only=False, run=False):
    """tools/train_net.py's setup (or main with ``run``) on a tiny config writing to tmp/out."""
    path = tmp_path / f"tiny_{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(tiny_cfg(config, str(tmp_path / "out")).dump())
    tn = load_script("tools/train_net.py")
    argv = ["--config-file", str(path)]
    argv += (["--resume"] if resume else []) + (["--eval-only"] if eval_only else []) + list(opts)
    args = tn.default_argument_parser().parse_args(argv)
    return tn.main(args) if run else tn.setup(args)


def _fails_unchanged(run_folder, exc, match, call):
    before = _folder_hash(run_folder)
    with pytest.raises(exc, match=match) as e:
        call()
    assert _folder_hash(run_folder) == before
    return str(e.value)


# --------------------------------------------------------------------------------------------------
# Annotation values (registration)
# --------------------------------------------------------------------------------------------------

VALUE_CASES = {
    # name: (edit of annotation 4, the words of the message)
    "negative_width": (lambda a: a["bbox"].__setitem__(2, -3.0), "bbox width <= 0"),
    "zero_height": (lambda a: a["bbox"].__setitem__(3, 0), "bbox height <= 0"),
    "nan_bbox": (lambda a: a["bbox"].__setitem__(0, float("nan")), "bbox is not finite"),
    "inf_bbox": (lambda a: a["bbox"].__setitem__(1, float("inf")), "bbox is not finite"),
    "string_in_bbox": (
        lambda a: a["bbox"].__setitem__(0, "10"),
        "bbox holds a value that is not a number",
    ),
    "null_in_bbox": (
        lambda a: a["bbox"].__setitem__(2, None),
        "bbox holds a value that is not a number",
    ),
    "bool_in_bbox": (
        lambda a: a["bbox"].__setitem__(2, True),
        "bbox holds a value that is not a number",
    ),
    "off_image": (lambda a: a["bbox"].__setitem__(0, 60.0), "bbox outside its image"),
    "negative_x": (lambda a: a["bbox"].__setitem__(0, -5.0), "bbox outside its image"),
    "nan_polygon": (
        lambda a: a["segmentation"][0].__setitem__(3, float("nan")),
        "polygon coordinate is not finite",
    ),
    "string_in_polygon": (
        lambda a: a["segmentation"][0].__setitem__(0, "x"),
        "polygon holds a value that is not a number",
    ),
    "zero_area": (lambda a: a.__setitem__("area", 0), "area <= 0"),
    "nan_area": (lambda a: a.__setitem__("area", float("nan")), "area is not finite"),
    "string_area": (lambda a: a.__setitem__("area", "12"), "area is not a number"),
}


@pytest.mark.parametrize("case", sorted(VALUE_CASES))
def test_invalid_annotation_value_is_named(tiny_dataset, tmp_path, case):
    edit, words = VALUE_CASES[case]
    path, data = _edited(tiny_dataset, tmp_path, lambda d: edit(d["annotations"][4]))
    a = data["annotations"][4]
    name = _uniq(case)
    with pytest.raises(LVISValueError) as e:
        register_lvis_format(name, path, tiny_dataset["image_root"])
    msg = str(e.value)
    n = len(data["annotations"])
    assert msg.startswith(f"{path} (dataset '{name}'): 1 of {n} annotation(s) have invalid values")
    assert f"  annotations[4] (id={a['id']!r}, image_id={a['image_id']!r}): {words}" in msg
    assert msg.endswith(
        "Fix the json, or set DATASETS.DROP_INVALID_ANNOTATIONS True to drop them "
        "(DATASETS.LVIS_FORMAT datasets; the count is logged)."
    )
    assert name not in DatasetCatalog.list()


def test_box_touching_the_border_is_accepted(tiny_dataset, tmp_path):
    # x + w up to width + BORDER_TOLERANCE is a box touching the border, not an error.
    def edit(d):
        a = d["annotations"][0]
        width = next(im["width"] for im in d["images"] if im["id"] == a["image_id"])
        a["bbox"][2] = width - a["bbox"][0] + 0.9 * BORDER_TOLERANCE

    path, data = _edited(tiny_dataset, tmp_path, edit)
    problems, bad_images = find_invalid_annotations(data)
    assert not problems.any() and not bad_images.any()
    register_lvis_format(_uniq("border"), path, tiny_dataset["image_root"])


def test_many_offenders_first_five_listed_and_total_counted(tiny_dataset, tmp_path):
    bad = [1, 3, 5, 7, 9, 11, 13]

    def edit(d):
        for i in bad:
            d["annotations"][i]["bbox"][2] = -1.0

    path, data = _edited(tiny_dataset, tmp_path, edit)
    with pytest.raises(LVISValueError) as e:
        register_lvis_format(_uniq("many"), path, tiny_dataset["image_root"])
    msg = str(e.value)
    assert f"{len(bad)} of {len(data['annotations'])} annotation(s) have invalid values (first 5 "
    assert [int(i) for i in re.findall(r"annotations\[(\d+)\]", msg)] == bad[:5]


def test_image_size_not_positive(tiny_dataset, tmp_path):
    path, data = _edited(tiny_dataset, tmp_path, lambda d: d["images"][2].__setitem__("height", 0))
    im = data["images"][2]
    with pytest.raises(
        LVISValueError,
        match=re.escape(
            f"{path}: 1 image(s) have a width or height that is not a positive number (first 1 "
            f"shown):\n  images[2] (id={im['id']}): width={im['width']}, height=0\n"
        ),
    ):
        register_lvis_format(_uniq("size"), path, tiny_dataset["image_root"])


@pytest.mark.parametrize("with_strings", [False, True])
def test_vectorised_check_matches_a_per_annotation_loop(tiny_dataset, with_strings):
    # Random corruptions; the vectorised mask must flag exactly what a plain loop flags. With
    # strings, the slow paths (a non-number somewhere) are taken for boxes and polygons.
    data = _load(tiny_dataset["train_json"])
    rng = np.random.default_rng(int(with_strings))
    for i in rng.choice(len(data["annotations"]), 60, replace=False):
        a = data["annotations"][i]
        kind = rng.integers(6 if with_strings else 4)
        if kind == 0:
            a["bbox"][rng.integers(4)] = float(rng.choice([np.nan, -2.0, 0.0, 1e4]))
        elif kind == 1:
            a["segmentation"][0][rng.integers(6)] = float("inf")
        elif kind == 2:
            a["area"] = float(rng.choice([0.0, -1.0, np.nan]))
        elif kind == 3:
            a["bbox"][1] = -float(rng.integers(0, 3))
        elif kind == 4:
            a["segmentation"][-1][rng.integers(6)] = "1"
        else:
            a["bbox"][rng.integers(4)] = "2"
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}

    def number(v):
        return type(v) in (int, float) and math.isfinite(v)

    def wrong(a):
        W, H = sizes[a["image_id"]]
        t = BORDER_TOLERANCE
        if all(map(number, a["bbox"])):
            x, y, w, h = a["bbox"]
            box_ok = w > 0 and h > 0 and x >= -t and y >= -t and x + w <= W + t and y + h <= H + t
        else:
            box_ok = False
        polys_ok = all(number(v) for p in a["segmentation"] for v in p)
        return not (box_ok and polys_ok and number(a["area"]) and a["area"] > 0)

    problems, _ = find_invalid_annotations(data)
    expected = np.array([wrong(a) for a in data["annotations"]])
    assert expected.sum() > 20
    np.testing.assert_array_equal(problems != 0, expected)


def test_drop_policy_logs_the_count_and_loads_without_them(
    tiny_dataset, tmp_path, caplog, monkeypatch
):
    monkeypatch.setenv("DISALIGN_CACHE_DIR", str(tmp_path / "cache"))
    bad = [0, 2, 4]

    def edit(d):
        for i in bad:
            d["annotations"][i]["segmentation"][0][0] = float("nan")

    path, data = _edited(tiny_dataset, tmp_path, edit)
    original = open(path, "rb").read()
    name = _uniq("drop")
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.DATASETS.LVIS_FORMAT = ((name, path, tiny_dataset["image_root"]),)
    cfg.DATASETS.DROP_INVALID_ANNOTATIONS = True
    with caplog.at_level(logging.WARNING, logger="disalign_det"):
        register_datasets_from_cfg(cfg)
    n = len(data["annotations"])
    logs = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert (
        len(logs) == 1 and f"(dataset '{name}'): dropped {len(bad)} of {n} annotation(s)" in logs[0]
    )
    meta = MetadataCatalog.get(name)
    # The loader and the evaluation read the cleaned copy; the user's json is untouched.
    assert meta.json_file != path and meta.json_file.startswith(str(tmp_path / "cache"))
    assert open(path, "rb").read() == original
    cleaned = _load(meta.json_file)
    assert [a["id"] for a in cleaned["annotations"]] == [
        a["id"] for i, a in enumerate(data["annotations"]) if i not in bad
    ]
    dicts = DatasetCatalog.get(name)
    assert sum(len(d["annotations"]) for d in dicts) == n - len(bad)


def test_strict_policy_through_train_net_keeps_the_run_folder(tiny_dataset, tmp_path, run_folder):
    path, _ = _edited(
        tiny_dataset, tmp_path, lambda d: d["annotations"][1]["bbox"].__setitem__(2, -1)
    )
    name = _uniq("strict")
    opts = ["DATASETS.LVIS_FORMAT", repr(((name, path, tiny_dataset["image_root"]),)),
            "DATASETS.TRAIN", f"('{name}',)"]  # fmt: skip
    _fails_unchanged(
        run_folder, LVISValueError, re.escape(f"{path} (dataset '{name}'): 1 of "),
        lambda: _train_net(tmp_path, opts=opts),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------------


def _without_images(tiny_dataset, tmp_path, split, drop):
    """The tiny ``split`` json with its own image root in which images ``drop`` are missing."""
    data = _load(tiny_dataset[f"{split}_json"])
    root = tmp_path / f"images_{uuid.uuid4().hex[:6]}"
    missing = []
    for i, im in enumerate(data["images"]):
        rel = "/".join(im["coco_url"].split("/")[-2:])
        dst = root / rel
        if i in drop:
            missing.append(str(dst))
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(os.path.join(tiny_dataset["image_root"], rel), dst)
    return _write(tmp_path / f"{split}_imgs.json", data), str(root) + os.sep, missing


def test_every_train_image_is_checked_at_load(tiny_dataset, tmp_path):
    # The last image only (the old check sampled 5 of them).
    n = len(_load(tiny_dataset["train_json"])["images"])
    path, root, missing = _without_images(tiny_dataset, tmp_path, "train", {n - 1})
    name = _uniq("img")
    register_lvis_format(name, path, root)
    with pytest.raises(
        ImageFilesError,
        match=re.escape(
            f"1 of {n} image(s) of {path} not found (first 1 shown):\n  {missing[0]}\n"
        ),
    ):
        DatasetCatalog.get(name)


def test_missing_train_images_fail_setup_and_keep_the_run_folder(
    tiny_dataset, tmp_path, run_folder
):
    path, root, missing = _without_images(tiny_dataset, tmp_path, "train", set(range(3, 10)))
    name = _uniq("imgs")
    opts = ["DATASETS.LVIS_FORMAT", repr(((name, path, root),)), "DATASETS.TRAIN", f"('{name}',)"]
    msg = _fails_unchanged(
        run_folder, ImageFilesError, re.escape(f"7 of 30 image(s) of {path} not found (first 5"),
        lambda: _train_net(tmp_path, opts=opts),
    )  # fmt: skip
    assert all(m in msg for m in missing[:5]) and missing[5] not in msg


def test_check_image_files_stats_each_path(tmp_path):
    present = tmp_path / "a.jpg"
    present.write_bytes(b"x")
    check_image_files([str(present)] * 3, "j.json", str(tmp_path))
    with pytest.raises(ImageFilesError, match=r"^2 of 3 image\(s\) of j\.json not found"):
        check_image_files(
            [str(present), str(tmp_path / "b.jpg"), str(tmp_path / "c")], "j.json", ""
        )


# --------------------------------------------------------------------------------------------------
# The val side, before training
# --------------------------------------------------------------------------------------------------


def _val_opts(name, path, root):
    return ["DATASETS.LVIS_FORMAT", repr(((name, path, root),)), "DATASETS.TEST", f"('{name}',)"]


def test_missing_val_image_fails_before_training(tiny_dataset, tmp_path, run_folder):
    path, root, missing = _without_images(tiny_dataset, tmp_path, "val", {11})
    name = _uniq("val_img")
    _fails_unchanged(
        run_folder, ImageFilesError,
        re.escape(f"1 of 12 image(s) of {path} not found (first 1 shown):\n  {missing[0]}"),
        lambda: _train_net(tmp_path, opts=_val_opts(name, path, root)),
    )  # fmt: skip


def test_nan_polygon_in_val_fails_before_training(tiny_dataset, tmp_path, run_folder):
    path, data = _edited(
        tiny_dataset, tmp_path,
        lambda d: d["annotations"][-1]["segmentation"][0].__setitem__(1, float("nan")), "val",
    )  # fmt: skip
    name = _uniq("val_nan")
    i = len(data["annotations"]) - 1
    _fails_unchanged(
        run_folder, LVISValueError,
        rf"annotations\[{i}\] \(id={data['annotations'][i]['id']}, .*polygon coordinate is not",
        lambda: _train_net(tmp_path, opts=_val_opts(name, path, tiny_dataset["image_root"])),
    )  # fmt: skip


def test_val_json_missing_fails_before_training(tiny_dataset, tmp_path, run_folder):
    name = _uniq("val_gone")
    gone = str(tmp_path / "gone.json")
    _fails_unchanged(
        run_folder, FileNotFoundError,
        re.escape(f"LVIS-format json of dataset '{name}' not found: '{gone}'"),
        lambda: _train_net(tmp_path, opts=_val_opts(name, gone, tiny_dataset["image_root"])),
    )  # fmt: skip


def test_val_category_without_frequency_is_filled_from_train(tiny_dataset, tmp_path, caplog):
    from lvis import LVIS

    path, data = _edited(
        tiny_dataset, tmp_path,
        lambda d: [c.pop("frequency") for c in d["categories"][:3]], "val",
    )  # fmt: skip
    train = _load(tiny_dataset["train_json"])
    train_images = [c["image_count"] for c in sorted(train["categories"], key=lambda c: c["id"])]
    gt = LVIS(path)
    with caplog.at_level(logging.WARNING, logger="disalign_det"):
        assert fill_missing_frequency(gt, (train_images, None), "v") == 3
    # LVIS's rule on the TRAIN image count n: rare n <= 10, common 11..100, frequent > 100.
    rule = lambda n: "r" if n <= 10 else ("c" if n <= 100 else "f")  # noqa: E731
    for c in data["categories"]:
        expected = rule(train_images[c["id"] - 1]) if c["id"] <= 3 else c["frequency"]
        assert gt.cats[c["id"]]["frequency"] == expected, c["id"]
    assert any("3 categor(y/ies) had no 'frequency'; filled from DATASETS.TRAIN image counts"
               in r.getMessage() for r in caplog.records)  # fmt: skip


def test_val_category_without_frequency_warns_at_setup_and_evaluator_fills(
    tiny_dataset, tmp_path, caplog
):
    from disalign_det.evaluation import build_lvis_evaluator

    path, _ = _edited(tiny_dataset, tmp_path, lambda d: d["categories"][0].pop("frequency"), "val")
    name = _uniq("val_freq")
    with caplog.at_level(logging.WARNING, logger="disalign_det"):
        cfg = _train_net(tmp_path, opts=_val_opts(name, path, tiny_dataset["image_root"]))
    assert any(f"(DATASETS.TEST '{name}'): 1 categor(y/ies) lack 'frequency' (ids [1]" in
               r.getMessage() for r in caplog.records)  # fmt: skip
    evaluator = build_lvis_evaluator(cfg, name, str(tmp_path / "ev"))
    train_n = MetadataCatalog.get("tiny_train").image_count[0]
    assert evaluator._lvis_api.cats[1]["frequency"] == frequency_bucket(train_n)


# --------------------------------------------------------------------------------------------------
# Checkpoints for inference
# --------------------------------------------------------------------------------------------------


def test_eval_only_other_class_count_fails_before_writing(stage_one, tmp_path, run_folder):
    opts = ["MODEL.ROI_HEADS.NUM_CLASSES", "7", "DATASETS.TRAIN", "()", "MODEL.WEIGHTS", stage_one]
    msg = _fails_unchanged(
        run_folder, ValueError,
        re.escape(f"{stage_one}: The checkpoint does not fit this model (6 shape mismatch(es)):"),
        lambda: _train_net(tmp_path, opts=opts, eval_only=True, run=True),
    )  # fmt: skip
    assert "roi_heads.box_predictor.cls_score.weight: checkpoint (7, 256), model (8, 256)" in msg
    assert "set MODEL.ROI_HEADS.NUM_CLASSES to the stage-one value" in msg


def test_eval_only_disalign_config_on_a_stage_one_checkpoint(stage_one, tmp_path, run_folder):
    # Stage two would initialise the calibration; evaluating it would use the identity init.
    msg = _fails_unchanged(
        run_folder, ValueError,
        re.escape(f"MODEL.WEIGHTS='{stage_one}' does not match this model exactly ("),
        lambda: _train_net(tmp_path, STAGE_TWO, ["MODEL.WEIGHTS", stage_one], eval_only=True),
    )  # fmt: skip
    assert "tensor(s) of the model missing: ['roi_heads.box_predictor.logit_scale'" in msg


def test_eval_only_other_architecture_extra_tensors(tiny_dataset, tmp_path, run_folder):
    # A checkpoint with a second fc in the box head, for a model with one: unexpected tensors.
    DetectionCheckpointer(build_model(tiny_cfg()), str(tmp_path)).save("two_fc")
    ckpt = str(tmp_path / "two_fc.pth")
    opts = ["MODEL.ROI_BOX_HEAD.NUM_FC", "1", "MODEL.WEIGHTS", ckpt]
    msg = _fails_unchanged(
        run_folder, ValueError, re.escape(f"MODEL.WEIGHTS='{ckpt}' does not match"),
        lambda: _train_net(tmp_path, opts=opts, eval_only=True),
    )  # fmt: skip
    assert ("2 tensor(s) of the checkpoint not in the model: ['roi_heads.box_head.fc2.weight', "
            "'roi_heads.box_head.fc2.bias']") in msg  # fmt: skip
    assert "MODEL.ROI_HEADS.NUM_CLASSES" in msg


def test_eval_only_disalign_without_weights_is_an_error(tiny_dataset, tmp_path, run_folder):
    _fails_unchanged(
        run_folder, ValueError,
        r"^MODEL\.WEIGHTS is empty: this DisAlign model would be evaluated with randomly",
        lambda: _train_net(tmp_path, STAGE_TWO, eval_only=True),
    )  # fmt: skip


def test_eval_only_weights_file_missing(tiny_dataset, tmp_path, run_folder):
    gone = str(tmp_path / "gone.pth")
    _fails_unchanged(
        run_folder, FileNotFoundError, re.escape(f"MODEL.WEIGHTS='{gone}' does not exist"),
        lambda: _train_net(tmp_path, opts=["MODEL.WEIGHTS", gone], eval_only=True),
    )  # fmt: skip


def test_plain_model_without_weights_warns_loudly(tiny_dataset, caplog):
    model = build_model(tiny_cfg())
    with caplog.at_level(logging.WARNING, logger="disalign_det"):
        assert load_for_inference(model, "") == {}
    assert any("MODEL.WEIGHTS is empty: the model is RANDOMLY INITIALISED" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_disalign_without_weights_only_warns_outside_evaluation(tiny_dataset, caplog):
    # Export / visualisation of a random DisAlign model is a legitimate try-out: a warning.
    model = Trainer.build_model(tiny_cfg(STAGE_TWO))
    with pytest.raises(ValueError, match=r"^MODEL\.WEIGHTS is empty: this DisAlign model"):
        load_for_inference(model, "")
    with caplog.at_level(logging.WARNING, logger="disalign_det"):
        assert load_for_inference(model, "", evaluating=False) == {}
    assert any("RANDOMLY INITIALISED" in r.getMessage() for r in caplog.records)


def test_eval_only_exact_checkpoint_loads(disalign_ckpt):
    model = Trainer.build_model(tiny_cfg(STAGE_TWO))
    load_for_inference(model, disalign_ckpt)
    saved = torch.load(disalign_ckpt, weights_only=False)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, torch.as_tensor(saved[k])), k


def test_predictor_loads_strictly(stage_one):
    cfg = tiny_cfg(opts=["MODEL.ROI_HEADS.NUM_CLASSES", "5", "MODEL.WEIGHTS", stage_one])
    with pytest.raises(ValueError, match=r"set MODEL\.ROI_HEADS\.NUM_CLASSES to the stage-one"):
        DisAlignPredictor(cfg)
    pred = DisAlignPredictor(tiny_cfg(opts=["MODEL.WEIGHTS", stage_one]))
    saved = torch.load(stage_one, weights_only=False)["model"]
    w = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(pred.model.state_dict()[w], torch.as_tensor(saved[w]))


def test_export_tool_loads_strictly(stage_one):
    em = load_script("tools/export_model.py")
    cfg = tiny_cfg(opts=["MODEL.ROI_HEADS.NUM_CLASSES", "5", "MODEL.WEIGHTS", stage_one])
    with pytest.raises(ValueError, match=r"The checkpoint does not fit this model"):
        em.build_eager_model(cfg)


def test_lazy_keys_are_named(stage_one):
    model = build_model(tiny_cfg(opts=["MODEL.ROI_HEADS.NUM_CLASSES", "5"]))
    with pytest.raises(ValueError) as e:
        InferenceCheckpointer(model, keys=LAZY_KEYS).load(stage_one, checkpointables=[])
    assert "set model.roi_heads.num_classes to the stage-one value" in str(e.value)
    assert "train.init_checkpoint" in str(e.value) and "MODEL." not in str(e.value)


# --------------------------------------------------------------------------------------------------
# Config values: all before OUTPUT_DIR is written
# --------------------------------------------------------------------------------------------------

CONFIG_CASES = {
    "rho": (["MODEL.DISALIGN.RHO", "-0.5"], r"MODEL\.DISALIGN\.RHO must be >= 0, got -0\.5"),
    "freeze": (["MODEL.DISALIGN.FREEZE", "everything"], r"MODEL\.DISALIGN\.FREEZE must be one of"),
    "posthoc": (["MODEL.DISALIGN.POSTHOC", "magic"], r"MODEL\.DISALIGN\.POSTHOC must be one of"),
    "cls_loss": (["MODEL.DISALIGN.CLS_LOSS", "focal"], r"MODEL\.DISALIGN\.CLS_LOSS must be one of"),
    "nothing_trainable": (
        ["MODEL.DISALIGN.BOX_CALIBRATION", "False", "MODEL.DISALIGN.MASK_CALIBRATION", "False"],
        r"leaves nothing to train",
    ),
    "frequency_source": (
        ["MODEL.DISALIGN.FREQUENCY_SOURCE", "guess"],
        r"MODEL\.DISALIGN\.FREQUENCY_SOURCE",
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_value_fails_before_config_yaml(stage_one, tmp_path, run_folder, case):
    opts, match = CONFIG_CASES[case]
    _fails_unchanged(
        run_folder, ValueError, match,
        lambda: _train_net(tmp_path, STAGE_TWO, ["MODEL.WEIGHTS", stage_one, *opts]),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------------------------------


def test_last_checkpoint_naming_a_deleted_file(stage_one, tmp_path, run_folder):
    (run_folder / "model_0000099.pth").write_bytes(b"x")
    (run_folder / "last_checkpoint").write_text("model_0000199.pth")
    expected = re.escape(
        f"{run_folder / 'last_checkpoint'} names 'model_0000199.pth', which does not exist in "
        f"{run_folder}. Checkpoints there: model_0000099.pth, model_final.pth."
    )
    _fails_unchanged(
        run_folder,
        FileNotFoundError,
        expected,
        lambda: _train_net(tmp_path, opts=["MODEL.WEIGHTS", stage_one], resume=True),
    )
    model = build_model(tiny_cfg())
    with pytest.raises(FileNotFoundError, match=expected):
        DisAlignCheckpointer(model, str(run_folder)).resume_or_load("", resume=True)


def test_stale_temporary_checkpoint_removed_on_next_start(stage_one, tmp_path, run_folder):
    dead = run_folder / "model_0000009.pth.tmp.999999999"  # no such process
    dead.write_bytes(b"half a checkpoint")
    live = run_folder / f"model_0000019.pth.tmp.{os.getppid()}"  # a running process
    live.write_bytes(b"being written")
    before = _folder_hash(run_folder)
    assert remove_stale_temporaries(str(run_folder)) == [str(dead)]
    after = _folder_hash(run_folder)
    assert after == {k: v for k, v in before.items() if k != dead.name}
    # tools/train_net.py does it once every check passed, before default_setup.
    dead.write_bytes(b"half a checkpoint")
    _train_net(tmp_path, opts=["MODEL.WEIGHTS", stage_one])
    assert not dead.exists() and live.exists()


def test_failing_setup_leaves_stale_temporaries_alone(stage_one, tmp_path, run_folder):
    (run_folder / "model_0000009.pth.tmp.999999999").write_bytes(b"half")
    _fails_unchanged(
        run_folder,
        ValueError,
        r"MODEL\.DISALIGN\.RHO must be >= 0",
        lambda: _train_net(
            tmp_path, STAGE_TWO, ["MODEL.WEIGHTS", stage_one, "MODEL.DISALIGN.RHO", "-1.0"]
        ),
    )


# --------------------------------------------------------------------------------------------------
# Custom data under built-in names
# --------------------------------------------------------------------------------------------------


def test_custom_json_at_a_builtin_path_gives_one_message(tiny_dataset, tmp_path, monkeypatch):
    # detectron2 registers lvis_v1_train with its 1203 class names and a json path under
    # $DETECTRON2_DATASETS (default: "datasets", relative to the working folder).
    name = "lvis_v1_train"
    json_file = MetadataCatalog.get(name).json_file
    if os.path.isabs(json_file):
        pytest.skip("DETECTRON2_DATASETS is absolute here: the built-in path is not in tmp_path")
    monkeypatch.chdir(tmp_path)
    os.makedirs(os.path.dirname(json_file))
    os.symlink(tiny_dataset["train_json"], json_file)
    expected = re.escape(
        f"Dataset '{name}' is registered with 1203 class names (detectron2's built-in list for "
        f"that name), but its json '{json_file}' has {TINY_CLASSES} categories: a custom json at a "
        "built-in path. Register it under a name of its own with DATASETS.LVIS_FORMAT (classes, "
        f"buckets and counts then come from the json) and set MODEL.ROI_HEADS.NUM_CLASSES "
        f"{TINY_CLASSES}."
    )
    for k in ("1203", str(TINY_CLASSES)):  # stage one, whatever NUM_CLASSES says
        cfg = tiny_cfg(opts=["DATASETS.TRAIN", f"('{name}',)", "MODEL.ROI_HEADS.NUM_CLASSES", k])
        with pytest.raises(ValueError, match=expected):
            check_num_classes(cfg)
    # Stage two's class counts: the same message (before any count is read).
    cfg = tiny_cfg(STAGE_TWO, opts=["DATASETS.TRAIN", f"('{name}',)"])
    with pytest.raises(ValueError, match=expected):
        class_counts_from_cfg(cfg)


# --------------------------------------------------------------------------------------------------
# LazyConfig entry point (tools/lazyconfig_train_net.py)
# --------------------------------------------------------------------------------------------------

LAZY = """
import torch
from detectron2.config import LazyCall as L
from omegaconf import OmegaConf

model = L(torch.nn.Linear)(in_features=2, out_features=3)
dataloader = OmegaConf.create(
    dict(train=dict(dataset=dict(names={train!r})), test=dict(dataset=dict(names={test!r})),
         evaluator=dict())
)
train = dict(output_dir={out!r}, init_checkpoint={init!r}, device="cpu")
"""


def _lazy_setup(tmp_path, train="tiny_train", test="tiny_val", init="", eval_only=False):
    path = tmp_path / f"lazy_{uuid.uuid4().hex[:6]}.py"
    path.write_text(LAZY.format(train=train, test=test, out=str(tmp_path / "out"), init=init))
    tool = load_script("tools/lazyconfig_train_net.py")
    argv = ["--config-file", str(path)] + (["--eval-only"] if eval_only else [])
    return tool.setup(tool.default_argument_parser().parse_args(argv))


def test_lazy_missing_val_image_fails_before_writing(tiny_dataset, tmp_path, run_folder):
    path, root, missing = _without_images(tiny_dataset, tmp_path, "val", {0})
    name = _uniq("lazy_val")
    register_lvis_format(name, path, root)
    _fails_unchanged(
        run_folder, ImageFilesError, re.escape(f"1 of 12 image(s) of {path} not found"),
        lambda: _lazy_setup(tmp_path, test=name),
    )  # fmt: skip


def test_lazy_eval_only_wrong_checkpoint_names_lazy_keys(tiny_dataset, tmp_path, run_folder):
    DetectionCheckpointer(torch.nn.Linear(2, 4), str(tmp_path)).save("other")
    ckpt = str(tmp_path / "other.pth")
    msg = _fails_unchanged(
        run_folder, ValueError, re.escape(f"{ckpt}: The checkpoint does not fit this model (2 "),
        lambda: _lazy_setup(tmp_path, init=ckpt, eval_only=True),
    )  # fmt: skip
    assert "  weight: checkpoint (4, 2), model (3, 2)" in msg
    assert "model.roi_heads.num_classes" in msg and "MODEL." not in msg


@pytest.mark.parametrize("posthoc", ["norcal", "fracal"])
def test_posthoc_statistics_may_be_missing_from_a_stage_one_checkpoint(stage_one, posthoc):
    # NorCal's / FRACAL's statistics buffers are computed from DATASETS.TRAIN at the first
    # inference when the checkpoint (a stage one) has none: not a mismatch. Any other missing
    # tensor still is.
    opts = [*POSTHOC_DELTA, "MODEL.DISALIGN.POSTHOC", posthoc]  # the benchmark's posthoc runs
    model = build_model(tiny_cfg(opts=opts))
    buffers = [k for k in model.state_dict() if k.split(".")[-1] in DISALIGN_BUFFER_NAMES]
    assert buffers, f"{posthoc} keeps its statistics as buffers"
    InferenceCheckpointer(model).load(stage_one, checkpointables=[])
    saved = torch.load(stage_one, weights_only=False)["model"]
    w = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(model.state_dict()[w], torch.as_tensor(saved[w]))
    del saved[w]
    partial = os.path.join(os.path.dirname(stage_one), f"partial_{posthoc}.pth")
    torch.save({"model": saved}, partial)
    with pytest.raises(ValueError, match=re.escape(f"missing: ['{w}']")):
        InferenceCheckpointer(build_model(tiny_cfg(opts=opts))).load(partial, checkpointables=[])
