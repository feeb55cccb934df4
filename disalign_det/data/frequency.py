"""Per-class training frequencies n_j and LVIS's rare/common/frequent buckets.

DisAlign's generalized re-weighting needs n_j for every class. It is read, in this order, from

1. the dataset's metadata (``image_count`` / ``instance_count`` lists that
   :func:`disalign_det.data.register_lvis_format` sets from the json);
2. the categories of the LVIS-format json named by the metadata's ``json_file`` (counted from its
   annotations when the categories lack the statistics);
3. the dataset dicts of ``DatasetCatalog`` (any detectron2 dataset with 0-based category ids).

Each source is a pure function of the files on disk, so every process of a distributed run gets the
same numbers without communicating.
"""

import logging
from typing import List, Sequence, Union

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "RARE_MAX_IMAGES",
    "COMMON_MAX_IMAGES",
    "FREQUENCY_SOURCES",
    "frequency_bucket",
    "get_class_counts",
    "get_class_frequency_buckets",
]

logger = logging.getLogger(__name__)

# LVIS (Gupta et al., 2019): a class is rare if it is in 1-10 TRAINING images, common if in 11-100,
# frequent if in more than 100.
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100
FREQUENCY_SOURCES = ("instance_count", "image_count")


def frequency_bucket(image_count: int) -> str:
    """LVIS frequency bucket ('r', 'c' or 'f') of a class present in ``image_count`` train images.

    A class in no image counts as rare (it is at the tail's end; LVIS has no such class).
    """
    if image_count <= RARE_MAX_IMAGES:
        return "r"
    if image_count <= COMMON_MAX_IMAGES:
        return "c"
    return "f"


def _check_source(source):
    if source not in FREQUENCY_SOURCES:
        raise ValueError(
            f"Unknown class-frequency source {source!r} (MODEL.DISALIGN.FREQUENCY_SOURCE): "
            f"expected one of {list(FREQUENCY_SOURCES)}"
        )


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
        # Imported here: datasets.py imports this module for the bucket rule.
        from .datasets import lvis_category_info

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
    _check_source(source)
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
        from .datasets import lvis_category_info

        return list(lvis_category_info(json_file).frequency)
    return [frequency_bucket(int(n)) for n in get_class_counts(dataset_name, "image_count")]
