"""Checks of a registered dataset as a whole, run before training writes anything.

* :func:`check_dataset_inputs`: a registered dataset's json (structure and values), every image
  and, for an evaluated dataset, categories without ``frequency``: what ``tools/*train_net.py``
  run before writing anything.
* :func:`check_builtin_classes`: a custom json at a built-in path (``lvis_v1_*``) is named once,
  consistently, instead of two contradictory NUM_CLASSES hints.
* :func:`fill_missing_frequency`: the evaluator's ground truth gets the r/c/f bucket of the
  categories whose ``frequency`` the json lacks (LVIS's evaluation needs it).

The per-value checks they use are in :mod:`.validate`.
"""

import logging
import os
from typing import Dict, Optional, Tuple

from .frequency import frequency_bucket
from .lvis_json import lvis_category_info
from .validate import README_HINT, SHOW, check_image_files, image_paths

__all__ = ["check_builtin_classes", "check_dataset_inputs", "fill_missing_frequency"]

logger = logging.getLogger(__name__)


def _lvis_files(name: str) -> Optional[Tuple[str, str]]:
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(name)
    json_file = getattr(meta, "json_file", None)
    if getattr(meta, "evaluator_type", None) != "lvis" or not json_file:
        return None
    return json_file, getattr(meta, "image_root", "")


def check_dataset_inputs(name: str, key: str) -> None:
    """Check the files of registered dataset ``name`` (``key``: the config key naming it, for the
    messages) before a run starts: its json (structure and values), that every image exists and,
    for an evaluated dataset (``DATASETS.TEST``), the categories' ``frequency``.

    Datasets without an LVIS json (``evaluator_type`` other than "lvis") are not checked.
    """
    from detectron2.data import DatasetCatalog

    if name not in DatasetCatalog.list():
        raise KeyError(
            f"Dataset '{name}' of {key} is not registered. Register LVIS-format data with "
            f"DATASETS.LVIS_FORMAT. {README_HINT}"
        )
    files = _lvis_files(name)
    if files is None:
        logger.info("Dataset '%s' (%s) has no LVIS json: its files are not pre-checked", name, key)
        return
    json_file, image_root = files
    if not os.path.isfile(json_file):
        # Generated datasets are written by their loader; the built-ins' loaders raise naming
        # the missing file.
        DatasetCatalog.get(name)
    info = lvis_category_info(json_file, name)
    check_image_files(image_paths(info.image_files, image_root), json_file, image_root)
    if key.endswith("TEST") and info.missing_frequency:
        logger.warning(
            "%s (%s '%s'): %d categor(y/ies) lack 'frequency' (ids %s...); the evaluation fills "
            "their r/c/f bucket from the DATASETS.TRAIN image counts (LVIS's rule), else from "
            "this json's own counts",
            json_file,
            key,
            name,
            len(info.missing_frequency),
            list(info.missing_frequency[:SHOW]),
        )


def check_builtin_classes(name: str) -> None:
    """ValueError if the json behind ``name`` does not have as many categories as its metadata
    names classes: a custom json placed at a built-in path (e.g. ``lvis/lvis_v1_train.json``),
    whose name carries detectron2's LVIS class list. Files that do not exist are not checked."""
    from detectron2.data import MetadataCatalog

    files = _lvis_files(name)
    if files is None or not os.path.isfile(files[0]):
        return
    classes = MetadataCatalog.get(name).get("thing_classes")
    k = lvis_category_info(files[0], name).num_classes
    if classes is not None and len(classes) != k:
        raise ValueError(
            f"Dataset '{name}' is registered with {len(classes)} class names (detectron2's "
            f"built-in list for that name), but its json '{files[0]}' has {k} categories: a "
            "custom json at a built-in path. Register it under a name of its own with "
            "DATASETS.LVIS_FORMAT (classes, buckets and counts then come from the json) and set "
            f"MODEL.ROI_HEADS.NUM_CLASSES {k}."
        )


def fill_missing_frequency(lvis_gt, train_counts, dataset_name: str) -> int:
    """Give every category of ``lvis_gt`` (an ``lvis.LVIS``) without ``frequency`` its LVIS bucket:
    from ``train_counts`` (``(image_count, instance_count)`` per contiguous class of the training
    set) when they cover the categories, else from the ground truth's own image counts. LVIS's
    evaluation reads ``frequency`` of every category (a KeyError after all inference otherwise).

    Returns:
        the number of categories filled (logged when > 0).
    """
    cats: Dict[int, dict] = lvis_gt.cats
    missing = sorted(c for c, cat in cats.items() if cat.get("frequency") not in ("r", "c", "f"))
    if not missing:
        return 0
    if train_counts is not None and len(train_counts[0]) == len(cats):
        counts, source = list(train_counts[0]), "DATASETS.TRAIN image counts"
    else:
        counts = [len(set(lvis_gt.cat_img_map.get(c, ()))) for c in sorted(cats)]
        source = f"the image counts of '{dataset_name}' itself (no matching DATASETS.TRAIN)"
    order = {c: k for k, c in enumerate(sorted(cats))}
    for c in missing:
        cats[c]["frequency"] = frequency_bucket(int(counts[order[c]]))
    logger.warning(
        "'%s': %d categor(y/ies) had no 'frequency'; filled from %s with LVIS's rule (rare 1-10 "
        "images, common 11-100, frequent > 100)",
        dataset_name,
        len(missing),
        source,
    )
    return len(missing)
