"""Classification data: the ImageNet-LT / Places-LT list readers and the iNaturalist 2018 json
reader on fixtures in their exact formats, registration and class counts, the CPU sets' long-tail
profiles, the mapper, the class-balanced sampler and the test loader."""

import json
import os
import zlib

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from disalign_det.data.classification import (
    ClassBalancedTrainingSampler,
    ClassificationMapper,
    build_classification_test_loader,
    class_image_counts,
    read_image_list,
    read_inaturalist_json,
    register_builtin_classification,
)
from disalign_det.data.classification_cpu import digits_lt, exponential_profile

# Lines as in the public files (OLTR's lists): ImageNet-LT paths under ILSVRC-2012's train/val,
# Places-LT paths under Places-365's data_256 / val_256.
IMAGENET_LT_TRAIN = """train/n01440764/n01440764_10026.JPEG 0
train/n01440764/n01440764_10027.JPEG 0
train/n01443537/n01443537_10007.JPEG 1
"""
IMAGENET_LT_TEST = """val/n01440764/ILSVRC2012_val_00000293.JPEG 0
val/n01443537/ILSVRC2012_val_00000236.JPEG 1
"""
PLACES_LT_TRAIN = """/a/airfield/00000035.jpg 0
/a/airfield/00000036.jpg 0
/a/airplane_cabin/00000021.jpg 1
"""
PLACES_LT_TEST = """Places365_val_00000002.jpg 1
"""
INAT_TRAIN = {
    "info": {"year": 2018},
    "images": [
        {
            "id": 10,
            "file_name": "train_val2018/Plantae/7477/3b60c9486db1d2ee875f11a669fbde4a.jpg",
            "width": 48,
            "height": 40,
        },
        {"id": 11, "file_name": "train_val2018/Aves/2000/aaa.jpg", "width": 48, "height": 40},
        {"id": 12, "file_name": "train_val2018/Aves/2000/bbb.jpg", "width": 48, "height": 40},
    ],
    "annotations": [
        {"id": 10, "image_id": 10, "category_id": 1},
        {"id": 11, "image_id": 11, "category_id": 0},
        {"id": 12, "image_id": 12, "category_id": 0},
    ],
    "categories": [
        {"id": 0, "name": "Aves 2000", "supercategory": "Aves"},
        {"id": 1, "name": "Plantae 7477", "supercategory": "Plantae"},
    ],
}


def _touch_images(root, rel_paths):
    for rel in rel_paths:
        path = os.path.join(root, rel.lstrip("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Textured, not flat: with flat images a batch of two gives batch norm (almost) no
        # variance to normalise by, its gradients explode and a one-iteration run can overflow.
        seed = zlib.crc32(rel.encode())
        pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format="JPEG")


def make_public_layout(root):
    """A tiny $DETECTRON2_DATASETS with the three public datasets' files (formats exact)."""
    files = {
        "ImageNet_LT/ImageNet_LT_train.txt": IMAGENET_LT_TRAIN,
        "ImageNet_LT/ImageNet_LT_val.txt": IMAGENET_LT_TEST,
        "ImageNet_LT/ImageNet_LT_test.txt": IMAGENET_LT_TEST,
        "Places_LT/Places_LT_train.txt": PLACES_LT_TRAIN,
        "Places_LT/Places_LT_val.txt": PLACES_LT_TEST,
        "Places_LT/Places_LT_test.txt": PLACES_LT_TEST,
        "inaturalist2018/train2018.json": json.dumps(INAT_TRAIN),
        "inaturalist2018/val2018.json": json.dumps(INAT_TRAIN),
    }
    for rel, text in files.items():
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel), "w") as f:
            f.write(text)
    for text in (IMAGENET_LT_TRAIN, IMAGENET_LT_TEST):
        _touch_images(os.path.join(root, "imagenet"), [ln.split()[0] for ln in text.splitlines()])
    for text in (PLACES_LT_TRAIN, PLACES_LT_TEST):
        _touch_images(os.path.join(root, "places365"), [ln.split()[0] for ln in text.splitlines()])
    _touch_images(
        os.path.join(root, "inaturalist2018"), [im["file_name"] for im in INAT_TRAIN["images"]]
    )
    return root


def test_image_list_reader(tmp_path):
    path = tmp_path / "ImageNet_LT_train.txt"
    path.write_text(IMAGENET_LT_TRAIN + "\n")
    dicts = read_image_list(str(path), "/data/imagenet")
    assert dicts == [
        {
            "file_name": "/data/imagenet/train/n01440764/n01440764_10026.JPEG",
            "image_id": 0,
            "label": 0,
        },
        {
            "file_name": "/data/imagenet/train/n01440764/n01440764_10027.JPEG",
            "image_id": 1,
            "label": 0,
        },
        {
            "file_name": "/data/imagenet/train/n01443537/n01443537_10007.JPEG",
            "image_id": 2,
            "label": 1,
        },
    ]
    places = tmp_path / "Places_LT_train.txt"
    places.write_text(PLACES_LT_TRAIN)
    assert read_image_list(str(places), "/p")[2]["file_name"] == "/p/a/airplane_cabin/00000021.jpg"
    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg 0\nb.jpg x\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected"):
        read_image_list(str(bad), "/r")
    with pytest.raises(FileNotFoundError, match="prepare_classification"):
        read_image_list(str(tmp_path / "missing.txt"), "/r")


def test_inaturalist_reader(tmp_path):
    path = tmp_path / "train2018.json"
    path.write_text(json.dumps(INAT_TRAIN))
    dicts = read_inaturalist_json(str(path), "/inat")
    assert [(d["image_id"], d["label"]) for d in dicts] == [(10, 1), (11, 0), (12, 0)]
    assert dicts[0]["file_name"] == (
        "/inat/train_val2018/Plantae/7477/3b60c9486db1d2ee875f11a669fbde4a.jpg"
    )
    broken = dict(INAT_TRAIN, annotations=INAT_TRAIN["annotations"][:2])
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"images\[2\] \(id 12\) has no annotation"):
        read_inaturalist_json(str(path), "/inat")
    unknown = dict(INAT_TRAIN, categories=INAT_TRAIN["categories"][:1])
    path.write_text(json.dumps(unknown))
    with pytest.raises(ValueError, match="unknown category_id 1"):
        read_inaturalist_json(str(path), "/inat")


def test_builtin_registration_counts_and_prepare_script(tmp_path):
    from conftest import load_script

    root = make_public_layout(str(tmp_path))
    register_builtin_classification(root)
    try:
        train = DatasetCatalog.get("imagenet_lt_train")
        assert len(train) == 3 and os.path.isfile(train[0]["file_name"])
        meta = MetadataCatalog.get("imagenet_lt_test")  # a test split: counts of the train list
        assert meta.class_image_count[:3] == [2, 1, 0] and len(meta.class_image_count) == 1000
        assert meta.evaluator_type == "classification" and meta.many_threshold == 100
        assert MetadataCatalog.get("places_lt_val").class_image_count[:2] == [2, 1]
        assert MetadataCatalog.get("inat2018_val").class_image_count[:2] == [2, 1]
        assert len(DatasetCatalog.get("inat2018_train")) == 3
        prepare = load_script("datasets/prepare_classification.py")
        # Counts differ from the real datasets': reported as not ready, naming the file.
        assert prepare.main(["--root", root, "--datasets", "imagenet_lt"]) == 1
        os.remove(os.path.join(root, "imagenet", "train/n01440764/n01440764_10026.JPEG"))
        problems = prepare.check(root, "imagenet_lt", None)
        assert any("1 of 3 checked images of train missing" in p for p in problems)
    finally:
        register_builtin_classification()  # back to $DETECTRON2_DATASETS


def test_class_image_counts_rejects_bad_labels():
    np.testing.assert_array_equal(
        class_image_counts([{"label": 2}, {"label": 0}, {"label": 2}], 4), [1, 0, 2, 0]
    )
    with pytest.raises(ValueError, match="label 4 outside"):
        class_image_counts([{"label": 4}], 4)


def test_digits_long_tail_profile_and_balanced_test():
    assert exponential_profile(10, 150, 50.0).tolist() == [150, 97, 63, 41, 26, 17, 11, 7, 5, 3]
    data = digits_lt()
    train = class_image_counts(data["train"], 10)
    test = class_image_counts(data["test"], 10)
    assert sorted(train.tolist(), reverse=True) == [150, 97, 63, 41, 26, 17, 11, 7, 5, 3]
    assert test.tolist() == [20] * 10
    assert not {d["image_id"] for d in data["train"]} & {d["image_id"] for d in data["test"]}
    img = data["train"][0]["image"]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.max() > 200
    meta = MetadataCatalog.get("digits_lt_test")
    assert meta.class_image_count == train.tolist()
    assert (meta.many_threshold, meta.few_threshold) == (50, 10)


def test_mapper_train_and_test_transforms(tmp_path):
    path = tmp_path / "x.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)).save(path)
    d = {"file_name": str(path), "label": 3, "image_id": 7}
    torch.manual_seed(0)
    out = ClassificationMapper(True)(d)
    assert out["image"].shape == (3, 224, 224) and out["image"].dtype == torch.uint8
    assert out["label"] == 3 and out["image_id"] == 7
    test = ClassificationMapper(False)
    a, b = test(d)["image"], test(d)["image"]
    assert torch.equal(a, b)  # deterministic: resize 256 (short side) + centre crop 224
    from torchvision.transforms import functional as TF

    expected = TF.center_crop(TF.resize(Image.open(path).convert("RGB"), 256), 224)
    assert torch.equal(a, torch.from_numpy(np.array(expected)).permute(2, 0, 1))


def test_class_balanced_sampler_is_balanced_and_deterministic():
    labels = [0] * 90 + [1] * 9 + [2]
    s = ClassBalancedTrainingSampler(labels, seed=3)
    it = iter(s)
    draws = np.array([next(it) for _ in range(6000)])
    per_class = np.bincount(np.asarray(labels)[draws], minlength=3) / len(draws)
    np.testing.assert_allclose(per_class, [1 / 3] * 3, atol=0.03)
    it2 = iter(ClassBalancedTrainingSampler(labels, seed=3))
    assert [next(it2) for _ in range(100)] == draws[:100].tolist()


def test_test_loader_keeps_every_image_once():
    data = [
        {"image": np.zeros((8, 8, 3), np.uint8), "label": i % 3, "image_id": i} for i in range(7)
    ]
    loader = build_classification_test_loader(
        data, mapper=ClassificationMapper(False, image_size=8, resize_size=8), batch_size=3
    )
    batches = list(loader)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [d["image_id"] for b in batches for d in b] == list(range(7))
