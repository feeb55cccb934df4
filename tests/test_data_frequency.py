"""Per-class counts n_j and r/c/f buckets, checked against hand-computed numbers."""

import disalign_det  # noqa: F401  isort:skip  (compat shims before detectron2 / lvis)

import json
import uuid

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from disalign_det.data import (
    frequency_bucket,
    get_class_counts,
    get_class_frequency_buckets,
    register_lvis_format,
    synthetic_categories,
)

SQUARE = [[0.0, 0.0, 4.0, 0.0, 4.0, 4.0, 0.0, 4.0]]


def uniq():
    return f"freq_{uuid.uuid4().hex[:8]}"


def lvis_json(tmp_path, per_image, num_classes, cat_stats=None, fname="d.json"):
    """LVIS-format json: ``per_image[i]`` lists the category ids of image i's annotations."""
    images, anns = [], []
    for i, cats in enumerate(per_image, start=1):
        images.append(
            {"id": i, "width": 8, "height": 8, "coco_url": f"http://x/train2017/{i:012d}.jpg"}
        )
        for c in cats:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": c,
                    "segmentation": SQUARE,
                    "area": 16.0,
                    "bbox": [0.0, 0.0, 4.0, 4.0],
                }
            )
    cats = [{"id": k, "name": f"class{k}"} for k in range(1, num_classes + 1)]
    for c, stats in zip(cats, cat_stats or []):
        c.update(stats)
    path = tmp_path / fname
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (tmp_path / "img").mkdir(exist_ok=True)
    return str(path)


# Class 1: 3 instances in 2 images; class 2: 1 in 1; class 3: none; class 4: 4 in 4 images.
PER_IMAGE = [[1, 1, 4], [1, 2, 4], [4], [4]]
INSTANCES = [3, 1, 0, 4]
IMAGES = [2, 1, 0, 4]


@pytest.fixture
def counted(tmp_path):
    name = uniq()
    register_lvis_format(name, lvis_json(tmp_path, PER_IMAGE, 4), str(tmp_path / "img"))
    return name


def test_counts_from_annotations_match_hand_counts(counted):
    inst = get_class_counts(counted)  # default source: instances
    assert inst.dtype == np.int64 and inst.shape == (4,)
    assert inst.tolist() == INSTANCES
    assert get_class_counts([counted], "image_count").tolist() == IMAGES
    # No frequency in the json: derived from the image counts (0 and 1..10 images are rare).
    assert get_class_frequency_buckets(counted) == ["r", "r", "r", "r"]


def test_category_statistics_take_precedence_over_annotations(tmp_path):
    # As in LVIS's val json: categories carry TRAIN statistics that differ from val's annotations.
    stats = [
        {"image_count": 150, "instance_count": 400, "frequency": "f"},
        {"image_count": 11, "instance_count": 12, "frequency": "c"},
        {"image_count": 10, "instance_count": 30, "frequency": "r"},
        {"image_count": 1, "instance_count": 1, "frequency": "r"},
    ]
    name = uniq()
    register_lvis_format(name, lvis_json(tmp_path, PER_IMAGE, 4, stats), str(tmp_path / "img"))
    assert get_class_counts(name).tolist() == [400, 12, 30, 1]
    assert get_class_counts(name, "image_count").tolist() == [150, 11, 10, 1]
    assert get_class_frequency_buckets(name) == ["f", "c", "r", "r"]


def test_counts_sum_over_datasets_and_k_must_agree(tmp_path, counted):
    other = uniq()
    sub = tmp_path / "o"
    sub.mkdir()
    register_lvis_format(other, lvis_json(sub, [[3], [3, 3, 2]], 4), str(sub / "img"))
    assert get_class_counts([counted, other]).tolist() == [3, 2, 3, 4]
    assert get_class_counts([counted, other], "image_count").tolist() == [2, 2, 2, 4]
    five = uniq()
    sub5 = tmp_path / "five"
    sub5.mkdir()
    register_lvis_format(five, lvis_json(sub5, [[5]], 5), str(sub5 / "img"))
    with pytest.raises(ValueError, match=r"has 4.*has 5"):
        get_class_counts([counted, five])


def test_unknown_source_names_the_config_key(counted):
    with pytest.raises(ValueError, match=r"MODEL\.DISALIGN\.FREQUENCY_SOURCE"):
        get_class_counts(counted, "box_count")


def test_frequency_bucket_thresholds():
    assert [frequency_bucket(n) for n in (0, 1, 10, 11, 100, 101, 5000)] == list("rrrccff")


def test_json_read_when_metadata_lacks_counts(tmp_path):
    # A dataset registered elsewhere with only json_file + evaluator_type (like detectron2's own).
    name = uniq()
    path = lvis_json(tmp_path, PER_IMAGE, 4)
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(json_file=path, evaluator_type="lvis", thing_classes=list("abcd"))
    assert get_class_counts(name).tolist() == INSTANCES
    assert get_class_counts(name, "image_count").tolist() == IMAGES


def test_dataset_dicts_fallback():
    name = uniq()
    dicts = [
        {"annotations": [{"category_id": 0}, {"category_id": 0}, {"category_id": 2}]},
        {"annotations": [{"category_id": 2}]},
        {"annotations": []},
    ]
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"])
    assert get_class_counts(name).tolist() == [2, 0, 2]
    assert get_class_counts(name, "image_count").tolist() == [1, 0, 2]
    assert get_class_frequency_buckets(name) == ["r", "r", "r"]
    with pytest.raises(KeyError, match="not registered"):
        get_class_counts(uniq())


def test_builtin_synthetic_counts_without_generation():
    cats = synthetic_categories()
    assert get_class_counts("lvis_synth_train").tolist() == [c["instance_count"] for c in cats]
    assert get_class_counts("lvis_synth_val", "image_count").tolist() == [
        c["image_count"] for c in cats
    ]
    buckets = get_class_frequency_buckets("lvis_synth_train")
    assert (buckets.count("r"), buckets.count("c"), buckets.count("f")) == (7, 8, 5)
