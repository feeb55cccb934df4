"""Registration of any LVIS-format json as a detectron2 dataset, with metadata from the json itself.

detectron2 v0.6's ``register_lvis_instances`` only knows the built-in LVIS class lists: any other
name fails with "No built-in metadata", and a name containing "v1" silently gets the 1203 LVIS
classes. :func:`register_lvis_format` registers any LVIS-format json instead, with the classes, the
r/c/f buckets and the per-class image/instance counts taken from the json. ``DATASETS.LVIS_FORMAT``
does the same from a config (:func:`register_datasets_from_cfg`).
"""

import functools
import logging
import os
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.datasets.lvis import load_lvis_json

from .dataset_checks import check_builtin_classes
from .lvis_json import README_HINT, lvis_category_info
from .validate import check_image_files

__all__ = [
    "check_num_classes",
    "claim_dataset_name",
    "load_lvis_format",
    "mark_registered",
    "num_classes_of",
    "register_datasets_from_cfg",
    "register_lvis_format",
]

logger = logging.getLogger(__name__)

# Our registrations: name -> (absolute json path, absolute image root ending in a separator).
_REGISTERED: Dict[str, Tuple[str, str]] = {}


def claim_dataset_name(name: str, json_file: str, image_root: str) -> bool:
    """Reserve ``name`` for these (absolute) files: False if it already holds exactly them (nothing
    to do), True if the caller must register it now; ValueError if it is taken otherwise."""
    key = (json_file, image_root)
    if name in _REGISTERED:
        if _REGISTERED[name] == key:
            return False
        old_json, old_root = _REGISTERED[name]
        raise ValueError(
            f"Dataset '{name}' is already registered with json_file='{old_json}', "
            f"image_root='{old_root}'; cannot re-register it with json_file='{json_file}', "
            f"image_root='{image_root}'. Use another name."
        )
    if name in DatasetCatalog.list():
        raise ValueError(
            f"Dataset '{name}' is already registered (by detectron2 or other code); choose another "
            "name for this LVIS-format json"
        )
    return True


def mark_registered(name: str, json_file: str, image_root: str) -> None:
    """Record that ``name`` now holds these files (after :func:`claim_dataset_name`)."""
    _REGISTERED[name] = (json_file, image_root)


def load_lvis_format(json_file: str, image_root: str, check_images: bool = True):
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"LVIS-format json not found: '{json_file}'. {README_HINT}")
    # dataset_name=None: with a name, v0.6 would replace our metadata with its built-in LVIS lists.
    dicts = load_lvis_json(json_file, image_root, None)
    if check_images:  # every image: one stat each (docs/errors.md)
        check_image_files([d["file_name"] for d in dicts], json_file, image_root)
    return dicts


def _normalise(json_file: str, image_root: str) -> Tuple[str, str]:
    # The loader concatenates image_root and the split folder as strings: end it with a separator.
    return os.path.abspath(json_file), os.path.join(os.path.abspath(image_root), "")


def register_lvis_format(
    name: str, json_file: str, image_root: str, drop_invalid: bool = False
) -> Metadata:
    """Register an LVIS-format dataset whose classes and statistics come from its json.

    Args:
        name: any dataset name (no built-in metadata is looked up, "v1" in it is harmless).
        json_file: LVIS-format json, category ids contiguous 1..K.
        image_root: folder such that ``image_root/<folder of coco_url>/<file name>`` is an image.
        drop_invalid: drop annotations with invalid values (logged with their count; the loader
            and the evaluation then read a cleaned copy) instead of raising
            :class:`~disalign_det.data.validate.LVISValueError`.

    Metadata set: ``thing_classes`` (names by category id), ``json_file``, ``image_root``,
    ``evaluator_type="lvis"``, ``class_frequency`` ('r'/'c'/'f' per class), ``class_image_count``
    (``[{"id", "image_count"}]``), ``image_count`` and ``instance_count`` (per contiguous class;
    from the json's categories, counted from its annotations if absent).

    Registering the same name again with the same files is a no-op; with other files it raises.
    """
    json_abs, root_abs = _normalise(json_file, image_root)
    if not claim_dataset_name(name, json_abs, root_abs):
        return MetadataCatalog.get(name)
    if not os.path.isfile(json_abs):
        raise FileNotFoundError(
            f"LVIS-format json of dataset '{name}' not found: '{json_file}'. {README_HINT}"
        )
    if not os.path.isdir(root_abs):
        raise FileNotFoundError(
            f"Image root of dataset '{name}' not found: '{image_root}'. {README_HINT}"
        )
    info = lvis_category_info(json_abs, name, drop_invalid)
    # info.json_file: json_abs, or its cleaned copy when annotations were dropped.
    DatasetCatalog.register(name, functools.partial(load_lvis_format, info.json_file, root_abs))
    mark_registered(name, json_abs, root_abs)
    meta = MetadataCatalog.get(name)
    meta.set(
        json_file=info.json_file, image_root=root_abs, evaluator_type="lvis", **info.metadata()
    )
    logger.info(
        "Registered LVIS-format dataset '%s': %d classes (%s r / %s c / %s f) from %s",
        name,
        info.num_classes,
        info.frequency.count("r"),
        info.frequency.count("c"),
        info.frequency.count("f"),
        json_abs,
    )
    return meta


def register_datasets_from_cfg(cfg) -> List[str]:
    """Register every ``(name, json_file, image_root)`` of ``cfg.DATASETS.LVIS_FORMAT``.

    Idempotent. Returns the names.
    """
    entries = cfg.DATASETS.get("LVIS_FORMAT", ())
    if isinstance(entries, str) or not isinstance(entries, (list, tuple)):
        raise ValueError(
            f"DATASETS.LVIS_FORMAT must be a list of (name, json_file, image_root) triples, "
            f"got {entries!r}"
        )
    names, drop = [], bool(cfg.DATASETS.get("DROP_INVALID_ANNOTATIONS", False))
    for i, entry in enumerate(entries):
        ok = (
            isinstance(entry, (list, tuple))
            and len(entry) == 3
            and all(isinstance(x, str) and x for x in entry)
        )
        if not ok:
            raise ValueError(
                f"DATASETS.LVIS_FORMAT[{i}] must be a (name, json_file, image_root) triple of "
                f"non-empty strings, got {entry!r}"
            )
        register_lvis_format(*entry, drop_invalid=drop)
        names.append(entry[0])
    return names


def num_classes_of(dataset_name: str) -> Optional[int]:
    """Number of classes of a registered dataset (None if its metadata has no thing_classes)."""
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(
            f"Dataset '{dataset_name}' is not registered. Register LVIS-format data with "
            f"DATASETS.LVIS_FORMAT. {README_HINT}"
        )
    classes = MetadataCatalog.get(dataset_name).get("thing_classes")
    return None if classes is None else len(classes)


def check_num_classes(cfg) -> None:
    """Raise ValueError if ``MODEL.ROI_HEADS.NUM_CLASSES`` differs from the class count of any
    dataset of ``DATASETS.TRAIN`` / ``DATASETS.TEST`` (registers ``DATASETS.LVIS_FORMAT`` first)."""
    register_datasets_from_cfg(cfg)
    expected = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for key in ("TRAIN", "TEST"):
        for name in getattr(cfg.DATASETS, key):
            check_builtin_classes(name)  # a custom json at a built-in path: one message
            k = num_classes_of(name)
            if k is None:
                logger.warning("Dataset '%s' has no thing_classes: NUM_CLASSES not checked", name)
                continue
            if k != expected:
                raise ValueError(
                    f"MODEL.ROI_HEADS.NUM_CLASSES={expected} but dataset '{name}' (DATASETS.{key}) "
                    f"has {k} classes; set MODEL.ROI_HEADS.NUM_CLASSES {k}"
                )
