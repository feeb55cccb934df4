"""Per-class training frequencies n_j and LVIS's rare/common/frequent buckets of a dataset.

DisAlign's generalized re-weighting needs n_j for every class. It is read, in this order, from

1. the dataset's metadata (``image_count`` / ``instance_count`` lists that
   :func:`disalign_det.data.register_lvis_format` sets from the json);
2. the categories of the LVIS-format json named by the metadata's ``json_file`` (counted from its
   annotations when the categories lack the statistics);
3. the dataset dicts of ``DatasetCatalog`` (any detectron2 dataset with 0-based category ids).

Each source is a pure function of the files on disk, so every process of a distributed run gets the
same numbers without communicating. :func:`class_counts_from_cfg` is what the models call.
"""

import logging
import os
from typing import List, Sequence, Union

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from .dataset_checks import check_builtin_classes
from .frequency import check_frequency_source, frequency_bucket
from .lvis_format import register_datasets_from_cfg
from .lvis_json import lvis_category_info

__all__ = ["class_counts_from_cfg", "get_class_counts", "get_class_frequency_buckets"]

logger = logging.getLogger(__name__)


def _counts_from_dicts(name, source) -> np.ndarray:
    meta = MetadataCatalog.get(name)
    classes = meta.get("thing_classes")
    if classes is None:
        raise ValueError(f"Dataset '{name}' has no thing_classes in its metadata: cannot count")
    counts = np.zeros(len(classes), dtype=np.int64)
    for record in DatasetCatalog.get(name):
        cats = [a["category_id"] for a in record.get("annotations", [])]
        if source == "image_count":
            cats = sorted(set(cats))
        np.add.at(counts, np.asarray(cats, dtype=np.int64), 1)
    return counts


def _counts_for(name, source) -> np.ndarray:
    meta = MetadataCatalog.get(name)
    values = meta.get(source)
    if values is not None:
        return np.asarray(values, dtype=np.int64)
    json_file = meta.get("json_file")
    if json_file and meta.get("evaluator_type") == "lvis":
        return np.asarray(getattr(lvis_category_info(json_file), source), dtype=np.int64)
    if name in DatasetCatalog.list():
        logger.info("Counting %s of '%s' from its dataset dicts", source, name)
        return _counts_from_dicts(name, source)
    raise KeyError(
        f"Dataset '{name}' is not registered; register it (e.g. DATASETS.LVIS_FORMAT) first"
    )


def get_class_counts(
    dataset_names: Union[str, Sequence[str]], source: str = "instance_count"
) -> np.ndarray:
    """(K,) int64 per-class counts n_j, summed over ``dataset_names``, by contiguous class id.

    Args:
        dataset_names: one registered dataset name or several (all must have the same K).
        source: "instance_count" (number of annotated instances of the class) or "image_count"
            (number of images containing it), as ``MODEL.DISALIGN.FREQUENCY_SOURCE``.
    """
    check_frequency_source(source)
    names = [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)
    if not names:
        raise ValueError("get_class_counts needs at least one dataset name")
    total = None
    for name in names:
        counts = _counts_for(name, source)
        if total is None:
            total, first = counts.copy(), name
        elif len(counts) != len(total):
            raise ValueError(
                f"Datasets disagree on the number of classes: '{first}' has {len(total)}, "
                f"'{name}' has {len(counts)}; they cannot share one classifier"
            )
        else:
            total += counts
    return total


def get_class_frequency_buckets(dataset_name: str) -> List[str]:
    """LVIS frequency bucket ('r', 'c', 'f') of each contiguous class of ``dataset_name``.

    Taken from the json's ``frequency`` fields (train statistics, also in LVIS's val json) when
    present, else derived from the per-class image counts with the LVIS thresholds.
    """
    meta = MetadataCatalog.get(dataset_name)
    buckets = meta.get("class_frequency")
    if buckets is not None:
        return list(buckets)
    json_file = meta.get("json_file")
    if json_file and meta.get("evaluator_type") == "lvis":
        return list(lvis_category_info(json_file).frequency)
    return [frequency_bucket(int(n)) for n in get_class_counts(dataset_name, "image_count")]


_CACHE = {}


def _json_stamp(name):
    json_file = getattr(MetadataCatalog.get(name), "json_file", None)
    if json_file and os.path.isfile(json_file):
        st = os.stat(json_file)
        return (json_file, st.st_mtime_ns, st.st_size)
    return (json_file,)


def class_counts_from_cfg(cfg) -> np.ndarray:
    """(K,) int64 training frequencies n_j of ``cfg.DATASETS.TRAIN`` by
    ``cfg.MODEL.DISALIGN.FREQUENCY_SOURCE``; checked against ``MODEL.ROI_HEADS.NUM_CLASSES``.

    The same json always gives the same counts, so every process of a distributed run computes
    identical GRW weights without communicating. Results are cached per (datasets, source, json
    file state): the box predictor (one per cascade stage) and the mask head share one read.
    """
    register_datasets_from_cfg(cfg)
    names = tuple(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError(
            "MODEL.DISALIGN needs class frequencies from DATASETS.TRAIN, which is empty "
            "(CLS_LOSS='grw', MASK_LOSS='grw' or POSTHOC='norcal')."
        )
    for name in names:
        check_builtin_classes(name)  # the message check_num_classes gives, not a NUM_CLASSES hint
    source = cfg.MODEL.DISALIGN.FREQUENCY_SOURCE
    key = (names, source, tuple(_json_stamp(n) for n in names))
    if key not in _CACHE:
        _CACHE[key] = np.asarray(get_class_counts(names, source), dtype=np.int64)
    counts = _CACHE[key].copy()
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if len(counts) != num_classes:
        raise ValueError(
            f"MODEL.ROI_HEADS.NUM_CLASSES={num_classes} but DATASETS.TRAIN={list(names)} has "
            f"{len(counts)} classes; set MODEL.ROI_HEADS.NUM_CLASSES {len(counts)}."
        )
    return counts
