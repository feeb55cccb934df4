"""Per-class training frequencies n_j for a config, computed once per (datasets, source)."""

import logging
import os

import numpy as np

__all__ = ["class_counts_from_cfg"]

logger = logging.getLogger(__name__)

_CACHE = {}


def _json_stamp(name):
    from detectron2.data import MetadataCatalog

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
    from ..data import get_class_counts, register_datasets_from_cfg

    register_datasets_from_cfg(cfg)
    names = tuple(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError(
            "MODEL.DISALIGN needs class frequencies from DATASETS.TRAIN, which is empty "
            "(CLS_LOSS='grw', MASK_LOSS='grw' or POSTHOC='norcal')."
        )
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
