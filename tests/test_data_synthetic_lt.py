"""The generator's "lvis" preset: LVIS's long-tail structure (families of fine-grained variants of
frequent parents, r/c/f proportions), orientations, and what neg / not-exhaustive ids mean."""

import disalign_det  # noqa: F401  isort:skip  (compat shims before detectron2 / lvis)

import filecmp
import json
import os
from collections import Counter

import numpy as np
import pytest
from common import evaluate_lvis, ground_truth_as_results, rasterize
from lvis import LVIS
from PIL import Image

from disalign_det.data import synthetic
from disalign_det.data.synthetic import families as synth_families
from disalign_det.data.synthetic import (
    generate_synthetic_lvis,
    plan_images,
    synthetic_categories,
    synthetic_styles,
)

# LVIS v1.0: 337 rare, 461 common, 405 frequent of 1203 (written here independently of the code).
LVIS_SHARES = {"r": 337 / 1203, "c": 461 / 1203, "f": 405 / 1203}
# Small enough to render in a few seconds, large enough for > 100-image frequent classes.
TINY_LT = dict(
    preset="lvis", num_classes=12, num_train_images=500, num_val_images=40, image_size=64
)


def lvis_bucket(n):
    if 1 <= n <= 10:
        return "r"
    if 11 <= n <= 100:
        return "c"
    assert n > 100
    return "f"


@pytest.fixture(scope="module")
def tiny_lt(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_lt")
    paths = generate_synthetic_lvis(str(out), seed=5, **TINY_LT)
    with open(paths["train_json"]) as f:
        train = json.load(f)
    with open(paths["val_json"]) as f:
        val = json.load(f)
    return paths, train, val


def _by_image(data):
    anns = {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        anns[a["image_id"]].append(a)
    return anns


@pytest.mark.parametrize("num_classes", [60, 80, 100])
def test_every_variant_has_a_frequent_parent_sharing_its_shape(num_classes):
    styles = synthetic_styles("lvis", num_classes)
    cats = synthetic_categories(
        preset="lvis", num_classes=num_classes, num_train_images=17 * num_classes
    )
    assert [c["name"] for c in cats] == [s.name for s in styles]
    assert [c["name"] for c in cats] == sorted(c["name"] for c in cats)  # ids alphabetical
    by_name = {s.name: (s, c) for s, c in zip(styles, cats)}
    details = {}
    for s, c in zip(styles, cats):
        assert c["frequency"] == lvis_bucket(c["image_count"])
        if c["frequency"] == "f":
            assert s.parent is None and s.detail == "none"
            continue
        # Rare and common classes: fine-grained variants of a frequent parent, same shape,
        # colour and texture (so the same mask), told apart by a painted detail only.
        assert s.parent is not None, s.name
        ps, pc = by_name[s.parent]
        assert pc["frequency"] == "f"
        assert (s.shape, s.colour, s.rgb, s.texture) == (ps.shape, ps.colour, ps.rgb, ps.texture)
        assert s.detail != "none" and ps.detail == "none"
        details.setdefault(s.parent, []).append(s.detail)
    # Siblings differ in their detail; most parents have variants, some have none (as in LVIS).
    assert all(len(set(d)) == len(d) for d in details.values())
    n_parents = sum(c["frequency"] == "f" for c in cats)
    assert n_parents // 2 < len(details) < n_parents
    # Parents differ from each other in shape or colour.
    parents = [s for s in styles if s.parent is None]
    assert len({(p.shape, p.colour) for p in parents}) == len(parents)


@pytest.mark.parametrize("num_classes", [60, 75, 100])
def test_rcf_proportions_are_lvis_v1s(num_classes):
    cats = synthetic_categories(
        preset="lvis", num_classes=num_classes, num_train_images=17 * num_classes
    )
    freq = Counter(c["frequency"] for c in cats)
    assert sum(freq.values()) == num_classes
    for b, share in LVIS_SHARES.items():
        # Rounding to whole classes: within one class of LVIS's share.
        assert abs(freq[b] - share * num_classes) < 1.0, (b, freq)
    assert synth_families.bucket_sizes(num_classes) == (freq["r"], freq["c"], freq["f"])


def test_default_lvis_preset():
    params = synthetic.generation_params(preset="lvis")
    assert params["num_classes"] == 60 and params["num_train_images"] == 1000
    cats = synthetic_categories(preset="lvis")
    assert Counter(c["frequency"] for c in cats) == {"r": 17, "c": 23, "f": 20}
    # Which variant is rare and how often each class appears depends on the seed.
    other = synthetic_categories(preset="lvis", seed=1)
    assert [c["name"] for c in other] == [c["name"] for c in cats]
    assert [c["image_count"] for c in other] != [c["image_count"] for c in cats]


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path, tiny_lt):
    paths, _, _ = tiny_lt
    a = generate_synthetic_lvis(str(tmp_path / "a"), seed=5, **TINY_LT)
    for key in ("train_json", "val_json"):
        assert filecmp.cmp(a[key], paths[key], shallow=False)
    for key in ("train_image_dir", "val_image_dir"):
        names = sorted(os.listdir(a[key]))
        assert names == sorted(os.listdir(paths[key]))
        _, mismatch, errors = filecmp.cmpfiles(a[key], paths[key], names, shallow=False)
        assert not mismatch and not errors
    assert plan_images(seed=6, **TINY_LT)["train"] != plan_images(seed=5, **TINY_LT)["train"]


def test_categories_without_rendering_are_the_train_annotations(tiny_lt):
    _, train, val = tiny_lt
    plan_kwargs = {k: TINY_LT[k] for k in ("preset", "num_classes", "num_train_images")}
    assert synthetic_categories(seed=5, **plan_kwargs) == train["categories"] == val["categories"]
    imgs, inst = Counter(), Counter()
    for image_id, anns in _by_image(train).items():
        inst.update(a["category_id"] for a in anns)
        imgs.update({a["category_id"] for a in anns})
    for c in train["categories"]:
        assert (c["image_count"], c["instance_count"]) == (imgs[c["id"]], inst[c["id"]])
        assert c["frequency"] == lvis_bucket(c["image_count"])
    assert {c["frequency"] for c in train["categories"]} == {"r", "c", "f"}


def test_images_of_both_orientations_and_varied_sizes(tiny_lt):
    paths, train, val = tiny_lt
    for data in (train, val):
        shapes = [(im["width"], im["height"]) for im in data["images"]]
        assert any(w > h for w, h in shapes) and any(h > w for w, h in shapes)
        # Short sides over 75-100% of image_size, aspect ratios up to 1.6.
        assert all(48 <= min(s) <= 64 and max(s) <= 1.6 * min(s) + 1 for s in shapes)
    assert len(set(shapes)) > 10
    for im in train["images"][:20]:
        with Image.open(paths["image_root"] + im["file_name"]) as img:
            assert img.size == (im["width"], im["height"])


def test_default_lvis_images_hold_several_classes():
    # Plans only (no pixels): what the default "lvis" dataset's images hold.
    for split, plans in plan_images(preset="lvis").items():
        per_image = [len({c for c, a in zip(p.objects, p.annotated) if a}) for p in plans]
        assert min(per_image) >= 1 and np.mean(per_image) > 3 and max(per_image) >= 5, split
        assert max(len(p.objects) for p in plans) <= 8


def test_neg_categories_are_absent_and_include_the_relatives(tiny_lt):
    _, train, val = tiny_lt
    plans = plan_images(seed=5, **TINY_LT)
    related = synth_families.related(synthetic_styles("lvis", 12))
    partial = 0
    for split, data in (("train", train), ("val", val)):
        anns = _by_image(data)
        for im, plan in zip(data["images"], plans[split]):
            neg = set(im["neg_category_ids"])
            annotated = {a["category_id"] for a in anns[im["id"]]}
            drawn = {c + 1 for c in plan.objects}  # everything rendered, annotated or not
            assert annotated <= drawn
            assert not neg & drawn, (im["id"], neg & drawn)
            # The absent relatives of what is there (the look-alikes) are verified negatives.
            relatives = {r + 1 for c in drawn for r in related[c - 1]} - drawn
            assert relatives <= neg
            absent = set(range(1, 13)) - drawn
            partial += neg < absent
    # As in LVIS, absence is verified for a subset of the absent classes only.
    assert partial > 0


def test_not_exhaustive_classes_have_unannotated_instances(tiny_lt):
    _, train, _ = tiny_lt
    plans = plan_images(seed=5, **TINY_LT)["train"]
    anns = _by_image(train)
    marked = 0
    for im, plan in zip(train["images"], plans):
        n_ann = Counter(a["category_id"] for a in anns[im["id"]])
        n_drawn = Counter(c + 1 for c in plan.objects)
        unannotated = Counter(c + 1 for c, a in zip(plan.objects, plan.annotated) if not a)
        assert sum(n_ann.values()) == len(plan.objects) - sum(unannotated.values())
        # Not exhaustive = present (annotated) with instances drawn but not annotated, and only
        # those classes have unannotated instances.
        assert set(im["not_exhaustive_category_ids"]) == set(unannotated)
        for c in im["not_exhaustive_category_ids"]:
            assert n_ann[c] >= 1 and n_drawn[c] > n_ann[c]
            assert c not in im["neg_category_ids"]
        marked += bool(im["not_exhaustive_category_ids"])
    assert 0.03 * len(plans) < marked < 0.5 * len(plans)


def test_variants_carry_their_detail_and_parents_do_not(tiny_lt):
    paths, train, _ = tiny_lt
    styles = synthetic_styles("lvis", 12)
    images = {im["id"]: im for im in train["images"]}
    dark = {"parent": [], "variant": []}
    for a in train["annotations"]:
        st = styles[a["category_id"] - 1]
        im = images[a["image_id"]]
        m = rasterize(a, im["height"], im["width"])
        inner = m & np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
        if inner.sum() < 40:
            continue
        with Image.open(paths["image_root"] + im["file_name"]) as img:
            pix = np.asarray(img.convert("RGB"), dtype=np.float64)[inner]
        # Share of interior pixels far darker than the class colour: the painted detail.
        frac = float((pix.sum(1) < 0.7 * sum(st.rgb)).mean())
        dark["parent" if st.parent is None else "variant"].append(frac)
        if min(len(v) for v in dark.values()) >= 40:
            break
    assert min(len(v) for v in dark.values()) >= 20
    assert np.median(dark["parent"]) < 0.03 < np.median(dark["variant"])


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_lvis_eval_of_ground_truth_is_perfect_and_parent_labels_are_not(tiny_lt, iou_type):
    paths, _, val = tiny_lt
    gt = LVIS(paths["val_json"])

    def evaluate(dets):
        return evaluate_lvis(gt, dets, iou_type)

    res = evaluate(ground_truth_as_results(val))
    for key in ("AP", "APr", "APc", "APf"):
        assert res[key] > 0.99, (key, res[key])
    # The frequency-biased classifier's mistake: every variant labelled as its frequent parent.
    # The variants score 0 and the parents lose precision (their relatives are verified negatives).
    styles = synthetic_styles("lvis", 12)
    ids = {s.name: k + 1 for k, s in enumerate(styles)}
    to_parent = {k + 1: ids[s.parent] if s.parent else k + 1 for k, s in enumerate(styles)}
    biased = evaluate(ground_truth_as_results(val, category_of=lambda c: to_parent[c]))
    assert biased["APr"] < 0.01 and biased["APc"] < 0.01
    assert biased["APf"] < 0.95


def test_too_few_images_or_classes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="num_train_images=200 is too small"):
        generate_synthetic_lvis(str(tmp_path), preset="lvis", num_train_images=200)
    with pytest.raises(ValueError, match="num_classes=500 needs 168 frequent parents.*fewer"):
        synthetic_styles("lvis", 500)
    with pytest.raises(ValueError, match="num_classes must be >= 3"):
        synthetic_styles("lvis", 2)
