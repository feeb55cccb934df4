"""datasets/prepare_lvis.py on a generated dataset laid out like LVIS v1.0, and on broken copies."""

import disalign_det  # noqa: F401  isort:skip  (compat shims before detectron2 / lvis)

import io
import json
import os
import shutil

import pytest
from common import load_script

from disalign_det.data import generate_synthetic_lvis


def load_tool():
    return load_script("datasets/prepare_lvis.py")


prepare_lvis = load_tool()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("src")
    return generate_synthetic_lvis(
        str(out), seed=0, num_classes=5, num_train_images=120, num_val_images=15, image_size=48
    )


@pytest.fixture
def root(tmp_path, source):
    """$DETECTRON2_DATASETS-style root: lvis/lvis_v1_{train,val}.json and coco/{train,val}2017."""
    (tmp_path / "lvis").mkdir()
    shutil.copy(source["train_json"], tmp_path / "lvis" / "lvis_v1_train.json")
    shutil.copy(source["val_json"], tmp_path / "lvis" / "lvis_v1_val.json")
    shutil.copytree(source["image_root"], tmp_path / "coco")
    return tmp_path


def run(*argv):
    out = io.StringIO()
    rc = prepare_lvis.main(list(argv), out=out)
    return rc, out.getvalue()


def test_complete_download_passes_and_prints_buckets(root, source):
    rc, out = run("--root", str(root), "--check-images", "all")
    assert rc == 0, out
    with open(source["train_json"]) as f:
        cats = json.load(f)["categories"]
    r, c, f = (sum(x["frequency"] == b for x in cats) for b in "rcf")
    assert f"rare/common/frequent = {r}/{c}/{f}" in out
    assert f >= 1 and c >= 1 and r >= 1
    assert "120 images" in out and "15 images" in out
    assert "120/120 checked images found" in out
    assert "OK:" in out


def test_sampled_image_check(root):
    rc, out = run("--root", str(root), "--check-images", "7", "--splits", "train")
    assert rc == 0 and "7/7 checked images found" in out


def test_missing_json_names_the_file_and_url(root):
    os.remove(root / "lvis" / "lvis_v1_val.json")
    rc, out = run("--root", str(root))
    assert rc == 1
    assert str(root / "lvis" / "lvis_v1_val.json") in out
    assert "lvis_v1_val.json.zip" in out and "FAILED: 1 problem(s)" in out


def test_missing_images_are_named(root):
    os.remove(root / "coco" / "train2017" / "000000000005.jpg")
    shutil.rmtree(root / "coco" / "val2017")
    rc, out = run("--root", str(root), "--check-images", "all")
    assert rc == 1
    assert "train: 1 of 120 checked images are missing" in out
    assert os.path.join(str(root / "coco" / "train2017"), "000000000005.jpg") in out
    assert "val: 15 of 15 checked images are missing" in out
    assert f"folder {root / 'coco' / 'val2017'} does not exist" in out
    assert "val2017.zip" in out


def test_missing_fields_and_bad_ids_are_named(root):
    path = root / "lvis" / "lvis_v1_train.json"
    data = json.loads(path.read_text())
    del data["images"][2]["coco_url"]
    del data["annotations"][0]["bbox"]
    path.write_text(json.dumps(data))
    rc, out = run("--root", str(root), "--splits", "train")
    assert rc == 1
    assert "1 of 120 images lack field 'coco_url' (first: images[2])" in out
    assert "annotations lack field 'bbox' (first: annotations[0])" in out

    data = json.loads(path.read_text())
    data["images"][2]["coco_url"] = "http://x/train2017/000000000003.jpg"
    data["annotations"][0]["bbox"] = [0, 0, 1, 1]
    data["categories"][0]["id"] = 77
    path.write_text(json.dumps(data))
    rc, out = run("--root", str(root), "--splits", "train")
    assert rc == 1 and "not contiguous" in out and "not in categories" in out

    path.write_text("{oops")
    rc, out = run("--root", str(root), "--splits", "train")
    assert rc == 1 and "does not parse as json" in out


def test_missing_root(tmp_path):
    rc, out = run("--root", str(tmp_path / "nowhere"))
    assert rc == 1 and "does not exist" in out and "DETECTRON2_DATASETS" in out


# --------------------------------------------------------------------------------------------------
# LVIS v0.5 (detectron2's lvis/lvis_v0.5_{train,val}.json)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def root_v05(tmp_path, source):
    (tmp_path / "lvis").mkdir()
    shutil.copy(source["train_json"], tmp_path / "lvis" / "lvis_v0.5_train.json")
    shutil.copy(source["val_json"], tmp_path / "lvis" / "lvis_v0.5_val.json")
    shutil.copytree(source["image_root"], tmp_path / "coco")
    return tmp_path


def test_v05_download_is_detected_and_checked(root_v05):
    rc, out = run("--root", str(root_v05), "--check-images", "all")
    assert rc == 0, out
    assert str(root_v05 / "lvis" / "lvis_v0.5_train.json") in out
    assert "OK: LVIS v0.5" in out and "v1.0" not in out
    # Explicitly asking for v1.0 where only v0.5 lies names the v1.0 files.
    rc, out = run("--root", str(root_v05), "--version", "1.0")
    assert rc == 1 and "lvis_v1_train.json.zip" in out and "FAILED: 2 problem(s)" in out


def test_v05_missing_json_names_the_file_and_url(root_v05):
    os.remove(root_v05 / "lvis" / "lvis_v0.5_val.json")
    rc, out = run("--root", str(root_v05), "--version", "0.5")
    assert rc == 1
    assert str(root_v05 / "lvis" / "lvis_v0.5_val.json") in out
    assert "lvis_v0.5_val.json.zip" in out and "FAILED: 1 problem(s)" in out


def test_both_versions_present_are_both_checked(root, source):
    shutil.copy(source["train_json"], root / "lvis" / "lvis_v0.5_train.json")
    rc, out = run("--root", str(root), "--splits", "train", "--check-images", "3")
    assert rc == 0, out
    assert "OK: LVIS v1.0" in out and "OK: LVIS v0.5" in out


def test_real_bucket_counts_are_compared_per_version(tmp_path):
    """A json with v0.5's 1230 classes whose buckets differ from v0.5's 454/461/315 is flagged."""
    (tmp_path / "lvis").mkdir()
    (tmp_path / "coco").mkdir()
    cats = [
        {"id": i + 1, "name": f"c{i + 1}", "frequency": "f", "image_count": 200,
         "instance_count": 300}
        for i in range(prepare_lvis.VERSIONS["0.5"]["num_classes"])
    ]  # fmt: skip
    data = {"images": [], "annotations": [], "categories": cats}
    (tmp_path / "lvis" / "lvis_v0.5_train.json").write_text(json.dumps(data))
    rc, out = run("--root", str(tmp_path), "--splits", "train")
    assert rc == 0, out
    assert "warning: LVIS v0.5 has r/c/f = 454/461/315; this json differs" in out
