"""Registration of LVIS-format datasets: loading, metadata from the json, errors, built-ins."""

import disalign_det  # noqa: F401  isort:skip  (compat shims before detectron2 / lvis)

import copy
import json
import multiprocessing
import os
import uuid

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from disalign_det.config import add_disalign_config
from disalign_det.data import (
    LVISFormatError,
    builtin,
    check_num_classes,
    ensure_synthetic_dataset,
    generate_synthetic_lvis,
    register_datasets_from_cfg,
    register_lvis_format,
    register_lvis_synth,
    synthetic,
    synthetic_categories,
)
from disalign_det.data.synthetic import cache as synthetic_cache

TINY = dict(num_classes=5, num_train_images=40, num_val_images=12, image_size=48)


def uniq(prefix="t"):
    # DatasetCatalog is process-global: every test registers fresh names.
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("reg")
    paths = generate_synthetic_lvis(str(out), seed=1, **TINY)
    with open(paths["train_json"]) as f:
        paths["train"] = json.load(f)
    return paths


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def test_load_gives_existing_files_and_zero_based_ids(synth):
    name = uniq()
    register_lvis_format(name, synth["train_json"], synth["image_root"])
    dicts = DatasetCatalog.get(name)
    data = synth["train"]
    assert len(dicts) == len(data["images"])
    anns_of = {}
    for a in data["annotations"]:
        anns_of.setdefault(a["image_id"], []).append(a)
    for d in dicts:
        assert os.path.isfile(d["file_name"])
        expected = os.path.join(synth["train_image_dir"], f"{d['image_id']:012d}.jpg")
        assert os.path.samefile(d["file_name"], expected)
        src = sorted(anns_of[d["image_id"]], key=lambda a: a["id"])
        assert [o["category_id"] for o in d["annotations"]] == [a["category_id"] - 1 for a in src]
        assert all(0 <= o["category_id"] < 5 for o in d["annotations"])


def test_metadata_comes_from_the_json(synth):
    name = uniq("custom_v1_like")  # "v1" in a name must not pull detectron2's 1203 classes
    register_lvis_format(name, synth["train_json"], synth["image_root"].rstrip(os.sep))
    meta = MetadataCatalog.get(name)
    cats = sorted(synth["train"]["categories"], key=lambda c: c["id"])
    assert meta.thing_classes == [c["name"] for c in cats]
    assert meta.class_frequency == [c["frequency"] for c in cats]
    assert meta.image_count == [c["image_count"] for c in cats]
    assert meta.instance_count == [c["instance_count"] for c in cats]
    assert meta.class_image_count == [
        {"id": c["id"], "image_count": c["image_count"]} for c in cats
    ]
    assert meta.evaluator_type == "lvis"
    assert os.path.samefile(meta.json_file, synth["train_json"])
    # A root given without the trailing separator still resolves (the loader concatenates).
    assert meta.image_root.endswith(os.sep)
    assert os.path.isfile(DatasetCatalog.get(name)[0]["file_name"])


def test_counts_and_frequency_computed_when_categories_lack_them(synth, tmp_path):
    data = copy.deepcopy(synth["train"])
    for c in data["categories"]:
        for k in ("image_count", "instance_count", "frequency"):
            del c[k]
    # Drop class 1's annotations but two: counts must come from the annotations actually there.
    keep = [a for a in data["annotations"] if a["category_id"] == 1][:2]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 1] + keep
    name = uniq()
    register_lvis_format(name, write_json(tmp_path / "x.json", data), synth["image_root"])
    meta = MetadataCatalog.get(name)
    inst = [sum(a["category_id"] == k for a in data["annotations"]) for k in range(1, 6)]
    imgs = [
        len({a["image_id"] for a in data["annotations"] if a["category_id"] == k})
        for k in range(1, 6)
    ]
    assert meta.instance_count == inst and meta.image_count == imgs
    assert meta.instance_count[0] == 2
    expected = ["r" if n <= 10 else "c" if n <= 100 else "f" for n in imgs]
    assert meta.class_frequency == expected


def test_same_registration_twice_is_noop_and_other_files_raise(synth):
    name = uniq()
    register_lvis_format(name, synth["train_json"], synth["image_root"])
    register_lvis_format(name, synth["train_json"], synth["image_root"])  # no error
    with pytest.raises(ValueError, match="already registered"):
        register_lvis_format(name, synth["val_json"], synth["image_root"])
    with pytest.raises(ValueError, match="already registered"):
        register_lvis_format("coco_2017_train", synth["train_json"], synth["image_root"])


def test_missing_files_raise_with_path_and_readme(synth, tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError) as e:
        register_lvis_format(uniq(), missing, synth["image_root"])
    assert missing in str(e.value) and "datasets/README.md" in str(e.value)
    with pytest.raises(FileNotFoundError, match="Image root .* not found"):
        register_lvis_format(uniq(), synth["train_json"], str(tmp_path / "noimg"))


def test_missing_images_raise_at_load_with_the_path_rule(synth, tmp_path):
    (tmp_path / "empty").mkdir()
    name = uniq()
    register_lvis_format(name, synth["train_json"], str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="coco_url"):
        DatasetCatalog.get(name)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: d.pop("annotations"), r"missing required top-level key\(s\) \['annotations'\]"),
        (lambda d: d["images"][3].pop("coco_url"), r"images\[3\].*lacks required field.*coco_url"),
        (lambda d: d["categories"][0].pop("name"), r"categories\[0\].*lacks.*'name'"),
        (lambda d: d["categories"][-1].update(id=9), r"contiguous 1..K \(K=5\).*\[9\]"),
        (
            lambda d: d["annotations"][7].update(category_id=42),
            r"annotations\[7\].*category_id 42, which is not among the 5 categories",
        ),
        (lambda d: d["annotations"][2].update(image_id=-5), r"annotations\[2\].*image_id -5"),
        (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4]]), "at least 3 points"),
    ],
)
def test_invalid_json_is_rejected_naming_file_and_problem(synth, tmp_path, corrupt, message):
    data = copy.deepcopy(synth["train"])
    corrupt(data)
    path = write_json(tmp_path / "bad.json", data)
    name = uniq()
    with pytest.raises(LVISFormatError, match=message) as e:
        register_lvis_format(name, path, synth["image_root"])
    assert path in str(e.value)
    assert name not in DatasetCatalog.list()  # nothing half-registered


def test_not_json_is_reported(synth, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(LVISFormatError, match="not valid json"):
        register_lvis_format(uniq(), str(path), synth["image_root"])


def make_cfg(train=(), test=(), lvis_format=(), num_classes=5):
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.DATASETS.TRAIN = tuple(train)
    cfg.DATASETS.TEST = tuple(test)
    cfg.DATASETS.LVIS_FORMAT = tuple(lvis_format)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    return cfg


def test_register_from_cfg_is_idempotent_and_checks_entries(synth):
    a, b = uniq(), uniq()
    entries = (
        (a, synth["train_json"], synth["image_root"]),
        [b, synth["val_json"], synth["image_root"]],
    )
    cfg = make_cfg(lvis_format=entries)
    assert register_datasets_from_cfg(cfg) == [a, b]
    assert register_datasets_from_cfg(cfg) == [a, b]
    assert len(MetadataCatalog.get(b).thing_classes) == 5
    for bad in [((a, synth["train_json"]),), ((a, "", synth["image_root"]),), ("abc",), "x"]:
        cfg.DATASETS.LVIS_FORMAT = bad
        with pytest.raises(ValueError, match=r"DATASETS\.LVIS_FORMAT"):
            register_datasets_from_cfg(cfg)


def test_check_num_classes(synth):
    name = uniq()
    entries = ((name, synth["train_json"], synth["image_root"]),)
    check_num_classes(make_cfg(train=[name], test=[name], lvis_format=entries, num_classes=5))
    with pytest.raises(ValueError) as e:
        check_num_classes(make_cfg(train=[name], lvis_format=entries, num_classes=1203))
    msg = str(e.value)
    assert "MODEL.ROI_HEADS.NUM_CLASSES=1203" in msg and name in msg and "has 5 classes" in msg
    with pytest.raises(ValueError, match="DATASETS.TEST"):
        check_num_classes(make_cfg(test=["lvis_synth_val"], num_classes=5))
    with pytest.raises(KeyError, match="not registered"):
        check_num_classes(make_cfg(train=["no_such_dataset"], num_classes=5))


def test_builtin_synthetic_metadata_needs_no_generation():
    for name in ("lvis_synth_train", "lvis_synth_val", "lvis_v1_train", "lvis_v1_val"):
        assert name in DatasetCatalog.list()
    meta = MetadataCatalog.get("lvis_synth_train")
    cats = synthetic_categories()
    assert meta.thing_classes == [c["name"] for c in cats]
    assert meta.class_frequency == [c["frequency"] for c in cats]
    assert meta.evaluator_type == "lvis"
    assert meta.json_file == os.path.abspath(
        os.path.join(
            os.getenv("DETECTRON2_DATASETS", "datasets"), "lvis_synth", "lvis_synth_train.json"
        )
    )
    assert MetadataCatalog.get("lvis_synth_val").thing_classes == meta.thing_classes
    # The layout registration spells out must be the generator's.
    paths = synthetic_cache.synth_paths("R", "S")
    assert paths["train_json"] == os.path.join("R", "S", synthetic.TRAIN_JSON)
    assert paths["val_json"] == os.path.join("R", "S", synthetic.VAL_JSON)
    assert paths["image_root"] == os.path.join("R", "S", synthetic.IMAGES_DIR, "")


def test_builtin_lvis_v1_keeps_detectron2_classes_and_reports_missing_json():
    meta = MetadataCatalog.get("lvis_v1_val")
    assert len(meta.thing_classes) == 1203 and meta.evaluator_type == "lvis"
    if os.path.isfile(meta.json_file):
        pytest.skip("a real LVIS download is present")
    with pytest.raises(FileNotFoundError, match="datasets/README.md"):
        meta.class_frequency
    with pytest.raises(FileNotFoundError, match="lvis_v1_val.json"):
        DatasetCatalog.get("lvis_v1_val")


def test_lvis_v1_style_registration_reads_frequency_lazily(synth, tmp_path):
    # Lay the tiny dataset out like LVIS v1 and register it the way the built-ins are.
    (tmp_path / "lvis").mkdir()
    os.symlink(os.path.dirname(synth["train_image_dir"]), tmp_path / "coco")
    data = copy.deepcopy(synth["train"])
    write_json(tmp_path / "lvis" / "lvis_v1_train.json", data)
    name = uniq("v1like")
    builtin.register_lvis_builtin(str(tmp_path), {name: ("lvis/lvis_v1_train.json", "coco/")})
    meta = MetadataCatalog.get(name)
    assert "class_frequency" not in meta.__dict__  # nothing read yet
    cats = data["categories"]
    assert meta.class_frequency == [c["frequency"] for c in cats]
    assert meta.thing_classes == [c["name"] for c in cats]
    assert len(DatasetCatalog.get(name)) == len(data["images"])


def test_synthetic_registration_generates_on_first_load(tmp_path):
    train, val = uniq(), uniq()
    register_lvis_synth(str(tmp_path), names=(train, val), seed=2, **TINY)
    register_lvis_synth(str(tmp_path), names=(train, val), seed=2, **TINY)  # idempotent
    meta = MetadataCatalog.get(train)
    expected = synthetic_categories(seed=2, num_classes=5, num_train_images=40)
    assert meta.thing_classes == [c["name"] for c in expected]
    assert not os.path.exists(tmp_path / "lvis_synth")  # metadata alone generates nothing
    dicts = DatasetCatalog.get(val)
    assert len(dicts) == 12 and all(os.path.isfile(d["file_name"]) for d in dicts)
    with open(tmp_path / "lvis_synth" / "lvis_synth_train.json") as f:
        assert json.load(f)["categories"] == expected
    assert len(DatasetCatalog.get(train)) == 40


def test_stale_synthetic_data_is_regenerated(tmp_path):
    train, val = uniq(), uniq()
    register_lvis_synth(str(tmp_path), names=(train, val), seed=2, **TINY)
    # Data of other parameters sits where the dataset lives: metadata must not be read from it.
    generate_synthetic_lvis(str(tmp_path / "lvis_synth"), seed=9, **TINY)
    meta = MetadataCatalog.get(train)
    seed2 = synthetic_categories(seed=2, num_classes=5, num_train_images=40)
    seed9 = synthetic_categories(seed=9, num_classes=5, num_train_images=40)
    assert [c["instance_count"] for c in seed2] != [c["instance_count"] for c in seed9]
    assert meta.instance_count == [c["instance_count"] for c in seed2]
    DatasetCatalog.get(train)  # regenerates with seed 2
    with open(tmp_path / "lvis_synth" / "lvis_synth_train.json") as f:
        data = json.load(f)
    assert data["categories"] == seed2
    assert data["info"]["synthetic_params"] == synthetic.generation_params(seed=2, **TINY)

    # A json written by an older generator version is stale too.
    data["info"]["synthetic_params"]["generator_version"] = synthetic.GENERATOR_VERSION - 1
    data["images"] = data["images"][:3]
    write_json(tmp_path / "lvis_synth" / "lvis_synth_train.json", data)
    paths = ensure_synthetic_dataset(str(tmp_path), seed=2, **TINY)
    with open(paths["train_json"]) as f:
        assert len(json.load(f)["images"]) == 40


def _ensure_in_child(root, queue):
    try:
        paths = ensure_synthetic_dataset(root, seed=5, **TINY)
        with open(paths["train_json"], "rb") as f:
            queue.put(f.read())
    except Exception as e:  # pragma: no cover - reported to the parent
        queue.put(repr(e))


@pytest.mark.slow
def test_concurrent_first_use_generates_once_and_consistently(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ref = generate_synthetic_lvis(str(tmp_path / "ref"), seed=5, **TINY)
    with open(ref["train_json"], "rb") as f:
        expected = f.read()
    assert results[0] == expected and results[1] == expected
    leftovers = [f for f in os.listdir(tmp_path / "lvis_synth") if ".tmp" in f]
    assert not leftovers


def test_builtin_lvis_v05_names_classes_and_missing_json():
    """detectron2's LVIS v0.5 names (1230 classes) with frequency metadata read from the json."""
    for name in ("lvis_v0.5_train", "lvis_v0.5_val"):
        meta = MetadataCatalog.get(name)
        assert len(meta.thing_classes) == 1230 and meta.evaluator_type == "lvis"
        # Other tests re-register the built-ins with the same root given as an absolute path.
        assert os.path.abspath(meta.json_file) == os.path.abspath(
            os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "lvis", f"{name}.json")
        )
        if os.path.isfile(meta.json_file):
            pytest.skip("a real LVIS v0.5 download is present")
        with pytest.raises(FileNotFoundError, match="datasets/README.md"):
            meta.class_frequency
        with pytest.raises(FileNotFoundError, match=f"{name}.json"):
            DatasetCatalog.get(name)


def test_lvis_v05_style_registration_reads_frequency_lazily(synth, tmp_path):
    (tmp_path / "lvis").mkdir()
    os.symlink(os.path.dirname(synth["train_image_dir"]), tmp_path / "coco")
    data = copy.deepcopy(synth["train"])
    write_json(tmp_path / "lvis" / "lvis_v0.5_val.json", data)
    name = uniq("v05like")
    builtin.register_lvis_builtin(str(tmp_path), {name: builtin.LVIS_V05_DATASETS["lvis_v0.5_val"]})
    meta = MetadataCatalog.get(name)
    assert "class_frequency" not in meta.__dict__  # nothing read yet
    cats = data["categories"]
    assert meta.class_frequency == [c["frequency"] for c in cats]
    assert meta.instance_count == [c["instance_count"] for c in cats]
    assert len(DatasetCatalog.get(name)) == len(data["images"])
