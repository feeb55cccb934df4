"""The built-in ``lvis_synth_lt_{train,val}`` (preset "lvis"): registered on import, metadata
without generation, and a cache keyed on the preset (a basic-preset copy is never reused)."""

import disalign_det  # noqa: F401  isort:skip  (compat shims before detectron2 / lvis)

import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from disalign_det.data import synthetic
from disalign_det.data.synthetic import cache as synthetic_cache
from disalign_det.data.synthetic import synthetic_categories


def test_builtin_lt_names_and_metadata_without_generation():
    for name in synthetic.LT_DATASETS:
        assert name in DatasetCatalog.list()
    meta = MetadataCatalog.get("lvis_synth_lt_train")
    cats = synthetic_categories(preset="lvis")
    assert len(cats) == 60
    assert meta.thing_classes == [c["name"] for c in cats]
    assert meta.class_frequency == [c["frequency"] for c in cats]
    # LVIS v1's 337 / 461 / 405 scaled to 60 classes by largest remainder.
    assert [meta.class_frequency.count(b) for b in "rcf"] == [17, 23, 20]
    assert meta.evaluator_type == "lvis"
    root = os.getenv("DETECTRON2_DATASETS", "datasets")
    assert meta.json_file == os.path.abspath(
        os.path.join(root, synthetic.LT_SUBDIR, synthetic.TRAIN_JSON)
    )
    assert MetadataCatalog.get("lvis_synth_lt_val").thing_classes == meta.thing_classes
    # The two built-in generated datasets are different data, in different folders.
    basic = MetadataCatalog.get("lvis_synth_train")
    assert len(basic.thing_classes) == 20 and basic.json_file != meta.json_file


def test_cache_is_keyed_on_the_preset(tmp_path):
    """A copy generated with the basic preset is stale for the lvis preset (and regenerated)."""
    small = dict(num_classes=12, num_train_images=500, num_val_images=40, image_size=48)
    paths = synthetic_cache.ensure_synthetic_dataset(str(tmp_path), "x", preset="basic", **small)
    with open(paths["train_json"]) as f:
        assert json.load(f)["info"]["synthetic_params"]["preset"] == "basic"
    expected = synthetic.generation_params(preset="lvis", **small)
    assert not synthetic_cache._synth_is_current(paths, expected)
    synthetic_cache.ensure_synthetic_dataset(str(tmp_path), "x", preset="lvis", **small)
    assert synthetic_cache._synth_is_current(paths, expected)
    with open(paths["train_json"]) as f:
        cats = json.load(f)["categories"]
    assert [c["name"] for c in cats] == [
        c["name"] for c in synthetic_categories(preset="lvis", num_classes=12, num_train_images=500)
    ]
