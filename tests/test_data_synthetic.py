"""The synthetic LVIS-format generator, basic preset: determinism, schema, buckets, exact masks.

The "lvis" preset (families, orientations, negatives) is tested in test_data_synthetic_lt.py."""

import disalign_det  # noqa: F401  isort:skip  (compat shims before detectron2 / lvis)

import filecmp
import json
import os

import numpy as np
import pytest
from common import evaluate_lvis, ground_truth_as_results, load_script, rasterize
from lvis import LVIS
from PIL import Image

from disalign_det.data import synthetic
from disalign_det.data.synthetic import (
    class_styles,
    generate_synthetic_lvis,
    synthetic_categories,
    visible_polygons,
)

TINY = dict(num_classes=6, num_train_images=130, num_val_images=30, image_size=64)

IMAGE_FIELDS = (
    "id",
    "width",
    "height",
    "coco_url",
    "flickr_url",
    "date_captured",
    "license",
    "neg_category_ids",
    "not_exhaustive_category_ids",
)
ANN_FIELDS = ("id", "image_id", "category_id", "segmentation", "area", "bbox")
CAT_FIELDS = (
    "id",
    "name",
    "synonyms",
    "def",
    "synset",
    "frequency",
    "image_count",
    "instance_count",
)


def lvis_bucket(n):
    # LVIS's definition, written independently of the code under test.
    if 1 <= n <= 10:
        return "r"
    if 11 <= n <= 100:
        return "c"
    assert n > 100
    return "f"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    paths = generate_synthetic_lvis(str(out), seed=3, **TINY)
    with open(paths["train_json"]) as f:
        train = json.load(f)
    with open(paths["val_json"]) as f:
        val = json.load(f)
    return paths, train, val


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path, tiny):
    paths, _, _ = tiny
    a = generate_synthetic_lvis(str(tmp_path / "a"), seed=3, **TINY)
    for key in ("train_json", "val_json"):
        assert filecmp.cmp(a[key], paths[key], shallow=False)
    for key in ("train_image_dir", "val_image_dir"):
        names = sorted(os.listdir(a[key]))
        assert names == sorted(os.listdir(paths[key]))
        _, mismatch, errors = filecmp.cmpfiles(a[key], paths[key], names, shallow=False)
        assert not mismatch and not errors
    b = generate_synthetic_lvis(str(tmp_path / "b"), seed=4, **TINY)
    with open(b["train_json"]) as f, open(a["train_json"]) as g:
        assert json.load(f)["annotations"] != json.load(g)["annotations"]


def test_layout_and_every_lvis_field(tiny):
    paths, train, val = tiny
    assert paths["image_root"].endswith(os.sep)
    for data, split, folder in ((train, "train", "train2017"), (val, "val", "val2017")):
        assert {"info", "licenses", "images", "annotations", "categories"} <= set(data)
        lv = LVIS(paths[f"{split}_json"])  # the official API accepts it
        assert len(lv.get_img_ids()) == len(data["images"])
        for im in data["images"]:
            assert all(k in im for k in IMAGE_FIELDS)
            # The detectron2 v0.6 loader's rule: image_root + folder of coco_url + basename.
            sub, name = im["coco_url"].split("/")[-2:]
            assert sub == folder and name == f"{im['id']:012d}.jpg"
            path = os.path.join(paths["image_root"] + sub, name)
            with Image.open(path) as img:
                assert img.size == (im["width"], im["height"]) == (64, 64)
            present = {a["category_id"] for a in lv.img_ann_map[im["id"]]}
            # Exhaustive annotation: every absent class is a verified negative.
            assert set(im["neg_category_ids"]) == set(range(1, 7)) - present
        for a in data["annotations"]:
            assert all(k in a for k in ANN_FIELDS)
        assert [c["id"] for c in data["categories"]] == list(range(1, 7))
        for c in data["categories"]:
            assert all(k in c for k in CAT_FIELDS)
    train_ann_ids = {a["id"] for a in train["annotations"]}
    assert train_ann_ids.isdisjoint(a["id"] for a in val["annotations"])
    assert {i["id"] for i in train["images"]}.isdisjoint(i["id"] for i in val["images"])


def test_category_stats_are_train_counts_and_buckets_follow_lvis(tiny):
    _, train, val = tiny
    imgs, inst = {}, {}
    for a in train["annotations"]:
        imgs.setdefault(a["category_id"], set()).add(a["image_id"])
        inst[a["category_id"]] = inst.get(a["category_id"], 0) + 1
    for c in train["categories"]:
        assert c["image_count"] == len(imgs[c["id"]])
        assert c["instance_count"] == inst[c["id"]]
        assert c["frequency"] == lvis_bucket(c["image_count"])
    assert {c["frequency"] for c in train["categories"]} == {"r", "c", "f"}
    # As in LVIS, the val json carries the TRAIN statistics.
    assert val["categories"] == train["categories"]
    # Every image has 1..max objects.
    per_image = {}
    for a in train["annotations"]:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    assert set(per_image) == {im["id"] for im in train["images"]}
    assert 1 <= min(per_image.values()) and max(per_image.values()) <= 6


def test_val_contains_every_class(tiny):
    _, _, val = tiny
    imgs = {}
    for a in val["annotations"]:
        imgs.setdefault(a["category_id"], set()).add(a["image_id"])
    assert sorted(imgs) == list(range(1, 7))
    assert min(len(v) for v in imgs.values()) >= 3


def _shoelace(flat):
    p = np.reshape(flat, (-1, 2))
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def test_polygons_reproduce_visible_masks_exactly(tiny):
    paths, train, _ = tiny
    by_image = {}
    for a in train["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for image_id, anns in list(by_image.items())[:60]:
        union = np.zeros((64, 64), dtype=np.int32)
        for a in anns:
            m = rasterize(a, 64, 64)
            assert a["area"] > 0 and m.sum() == a["area"]
            ys, xs = np.nonzero(m)
            x, y, w, h = a["bbox"]
            assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == [
                x,
                y,
                w,
                h,
            ]
            # Polygons along pixel edges: their shoelace area is the pixel count exactly.
            assert sum(_shoelace(p) for p in a["segmentation"]) == pytest.approx(a["area"])
            pts = np.concatenate([np.reshape(p, (-1, 2)) for p in a["segmentation"]])
            assert (pts[:, 0] >= x).all() and (pts[:, 0] <= x + w).all()
            assert (pts[:, 1] >= y).all() and (pts[:, 1] <= y + h).all()
            union += m
        # Visible masks: occluded parts belong to the occluder only, so no pixel is shared.
        assert union.max() == 1


def test_solid_objects_have_their_class_colour(tiny):
    paths, train, _ = tiny
    styles = class_styles(6)
    checked = 0
    for a in train["annotations"][:200]:
        st = styles[a["category_id"] - 1]
        m = rasterize(a, 64, 64)
        if st.texture != "solid" or m.sum() < 30:
            continue
        path = os.path.join(paths["train_image_dir"], f"{a['image_id']:012d}.jpg")
        pix = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        # Interior only: JPEG smears the edges.
        inner = m & np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
        med = np.median(pix[inner], axis=0)
        assert np.abs(med - np.array(st.rgb)).max() < 40, (st.name, med)
        checked += 1
    assert checked > 20


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_lvis_eval_of_ground_truth_is_perfect(tiny, iou_type):
    paths, _, val = tiny
    gt = LVIS(paths["val_json"])

    def evaluate(dets):
        return evaluate_lvis(gt, dets, iou_type)

    res = evaluate(ground_truth_as_results(val))
    for key in ("AP", "APr", "APc", "APf"):
        assert res[key] > 0.99, (key, res[key])
    # Control: the same boxes with wrong labels score far lower, so 1.0 above is earned.
    wrong = evaluate(ground_truth_as_results(val, category_of=lambda c: c % 6 + 1))
    assert wrong["AP"] < 0.3


def test_categories_without_rendering_match_and_ignore_val_and_image_size(tiny):
    _, train, _ = tiny
    cats = synthetic_categories(seed=3, num_classes=6, num_train_images=130)
    assert cats == train["categories"]
    assert cats != synthetic_categories(seed=4, num_classes=6, num_train_images=130)


def test_default_profile_has_all_three_buckets():
    cats = synthetic_categories()
    freq = [c["frequency"] for c in cats]
    assert len(cats) == synthetic.DEFAULT_NUM_CLASSES == 20
    assert (freq.count("f"), freq.count("c"), freq.count("r")) == (5, 8, 7)
    for c in cats:
        assert c["frequency"] == lvis_bucket(c["image_count"])
        assert c["instance_count"] >= c["image_count"]


def test_class_styles_unique_and_bounded():
    n = len(synthetic.SHAPES) * len(synthetic.COLOURS) * len(synthetic.TEXTURES)
    styles = class_styles(n)
    assert len({(s.shape, s.colour, s.texture) for s in styles}) == n
    assert len({s.name for s in styles}) == n
    # Neighbouring classes differ in shape and in colour.
    for a, b in zip(styles[:20], styles[1:21]):
        assert a.shape != b.shape and a.colour != b.colour
    with pytest.raises(ValueError, match="num_classes"):
        class_styles(n + 1)


def test_visible_polygons_refuse_holes_and_trace_pixel_edges():
    m = np.zeros((20, 20), np.uint8)
    m[5:12, 4:9] = 1
    polys = visible_polygons(m)
    assert len(polys) == 1
    pts = np.reshape(polys[0], (-1, 2))
    # Pixel edges, not pixel centres: x spans 4..9 and y 5..12.
    assert pts[:, 0].min() == 4 and pts[:, 0].max() == 9
    assert pts[:, 1].min() == 5 and pts[:, 1].max() == 12
    m[7, 6] = 0  # a hole
    assert visible_polygons(m) is None


def test_bad_sizes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        generate_synthetic_lvis(str(tmp_path), num_classes=2, num_train_images=10)
    with pytest.raises(ValueError, match="do not fit"):
        generate_synthetic_lvis(str(tmp_path), num_classes=60, num_train_images=5)


def test_basic_preset_defaults_are_the_documented_ones():
    params = synthetic.generation_params()
    assert params["preset"] == "basic"
    expected = dict(num_classes=20, num_train_images=700, num_val_images=160, image_size=128)
    assert {k: params[k] for k in expected} == expected
    assert params["generator_version"] == synthetic.GENERATOR_VERSION
    with pytest.raises(ValueError, match="unknown synthetic preset 'nope'.*basic.*lvis"):
        synthetic.generation_params(preset="nope")
    with pytest.raises(TypeError, match="unknown generator parameter"):
        synthetic.generation_params(num_clases=3)


def test_cli_prints_bucket_summary(tmp_path, capsys):
    cli = load_script("datasets/prepare_synthetic.py")
    argv = ["--out", str(tmp_path), "--num-classes", "5", "--num-train", "120", "--num-val", "10"]
    assert cli.main(argv + ["--image-size", "48"]) == 0
    out = capsys.readouterr().out
    assert "train: 120 images" in out and "val: 10 images" in out
    cats = synthetic_categories(num_classes=5, num_train_images=120)
    n_f = sum(c["frequency"] == "f" for c in cats)
    assert f"frequent (>100 train images): {n_f} classes" in out
    with open(tmp_path / "lvis_synth_train.json") as f:
        assert json.load(f)["categories"] == cats
    # Bad options: a clear message and exit status 2, no traceback.
    assert cli.main(["--out", str(tmp_path / "x"), "--preset", "lvis", "--num-train", "50"]) == 2
    assert "num_train_images=50 is too small" in capsys.readouterr().err
