"""Reading and validating LVIS-format json files, and the class summary taken from them.

:func:`read_lvis_json` parses and checks what detectron2's LVIS loader and ``LVISEval`` rely on;
:func:`lvis_category_info` gives the classes, r/c/f buckets and image / instance counts of a json
(cached per file state: only the small summary is kept, never the parsed json).
"""

import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .frequency import counts_from_annotations, frequency_bucket
from .validate import README_HINT, LVISFormatError, apply_value_policy, write_cleaned_json

__all__ = [
    "README_HINT",
    "LVISFormatError",
    "LVISCategoryInfo",
    "category_info_from_dict",
    "lvis_category_info",
    "read_lvis_json",
    "validate_lvis_dict",
]

logger = logging.getLogger(__name__)


REQUIRED_TOP_LEVEL = ("images", "annotations", "categories")
REQUIRED_IMAGE_FIELDS = ("id", "width", "height", "coco_url")
REQUIRED_ANNOTATION_FIELDS = ("id", "image_id", "category_id", "segmentation", "area", "bbox")
REQUIRED_CATEGORY_FIELDS = ("id", "name")


def _first_missing(records, fields, what, json_file):
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise LVISFormatError(f"{json_file}: {what}[{i}] is not an object")
        missing = [f for f in fields if f not in rec]
        if missing:
            raise LVISFormatError(
                f"{json_file}: {what}[{i}] (id={rec.get('id')!r}) lacks required field(s) "
                f"{missing}; every entry of '{what}' needs {list(fields)}"
            )


def validate_lvis_dict(data: dict, json_file: str = "<json>") -> None:
    """Raise :class:`LVISFormatError` naming ``json_file`` if ``data`` is not usable LVIS format.

    Checks what detectron2's LVIS loader and LVISEval rely on: the top-level keys, the fields of
    every image / annotation / category, category ids contiguous 1..K (the loader maps id -> id - 1
    and the evaluator maps back with + 1), unique ids, annotations pointing at existing images and
    categories, and polygons of at least 3 points.
    """
    if not isinstance(data, dict):
        raise LVISFormatError(
            f"{json_file}: top level must be an object, got {type(data).__name__}"
        )
    missing = [k for k in REQUIRED_TOP_LEVEL if k not in data]
    if missing:
        raise LVISFormatError(f"{json_file}: missing required top-level key(s) {missing}")
    cats, imgs, anns = data["categories"], data["images"], data["annotations"]
    _first_missing(cats, REQUIRED_CATEGORY_FIELDS, "categories", json_file)
    _first_missing(imgs, REQUIRED_IMAGE_FIELDS, "images", json_file)
    _first_missing(anns, REQUIRED_ANNOTATION_FIELDS, "annotations", json_file)
    if not cats:
        raise LVISFormatError(f"{json_file}: 'categories' is empty")

    cat_ids = [c["id"] for c in cats]
    if len(set(cat_ids)) != len(cat_ids):
        raise LVISFormatError(f"{json_file}: duplicate category ids")
    expected = set(range(1, len(cat_ids) + 1))
    if set(cat_ids) != expected:
        bad = sorted(set(cat_ids) - expected, key=str)[:10]
        raise LVISFormatError(
            f"{json_file}: category ids must be contiguous 1..K (K={len(cat_ids)}), as "
            f"detectron2's LVIS loader and evaluator assume; unexpected ids {bad}. Renumber the "
            "categories (and the annotations' category_id) to 1..K."
        )

    img_ids = set()
    for i, im in enumerate(imgs):
        if im["id"] in img_ids:
            raise LVISFormatError(f"{json_file}: duplicate image id {im['id']!r}")
        img_ids.add(im["id"])
        url = im["coco_url"]
        # The loader takes the split folder and file name from the last two '/' parts.
        if not isinstance(url, str) or len(url.split("/")) < 2:
            raise LVISFormatError(
                f"{json_file}: images[{i}] coco_url {url!r} must end with '<folder>/<file name>' "
                "(detectron2 builds image_root + folder + file name from it)"
            )

    cat_set = set(cat_ids)
    ann_ids = set()
    for i, a in enumerate(anns):
        if a["id"] in ann_ids:
            raise LVISFormatError(f"{json_file}: duplicate annotation id {a['id']!r}")
        ann_ids.add(a["id"])
        if a["category_id"] not in cat_set:
            raise LVISFormatError(
                f"{json_file}: annotations[{i}] (id={a['id']!r}) has category_id "
                f"{a['category_id']!r}, which is not among the {len(cat_ids)} categories"
            )
        if a["image_id"] not in img_ids:
            raise LVISFormatError(
                f"{json_file}: annotations[{i}] (id={a['id']!r}) has image_id {a['image_id']!r}, "
                "which is not among the images"
            )
        segm = a["segmentation"]
        if (
            not isinstance(segm, list)
            or not segm
            or any(not isinstance(p, list) or len(p) < 6 or len(p) % 2 for p in segm)
        ):
            raise LVISFormatError(
                f"{json_file}: annotations[{i}] (id={a['id']!r}) segmentation must be a non-empty "
                "list of polygons [x1, y1, x2, y2, ...] with at least 3 points each"
            )
        if not isinstance(a["bbox"], list) or len(a["bbox"]) != 4:
            raise LVISFormatError(
                f"{json_file}: annotations[{i}] (id={a['id']!r}) bbox must be [x, y, w, h]"
            )


def read_lvis_json(
    json_file: str, dataset_name: Optional[str] = None, drop_invalid: bool = False
) -> dict:
    """Parse and validate an LVIS-format json (structure here, values in :mod:`.validate`); clear
    errors name the file (and dataset). ``drop_invalid``: annotations with invalid values are
    dropped (logged with their count) instead of raising."""
    return _read_checked(json_file, dataset_name, drop_invalid)[0]


def _read_checked(json_file, dataset_name, drop_invalid):
    """(data, number of annotations dropped) of :func:`read_lvis_json`."""

    who = f" of dataset '{dataset_name}'" if dataset_name else ""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"LVIS-format json{who} not found: '{json_file}'. {README_HINT}")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise LVISFormatError(f"{json_file}: not valid json ({e})") from e
    validate_lvis_dict(data, json_file)
    return apply_value_policy(data, json_file, drop_invalid, dataset_name)


@dataclass(frozen=True)
class LVISCategoryInfo:
    """Classes of an LVIS-format json in contiguous order (index k = category id k + 1)."""

    json_file: str
    thing_classes: Tuple[str, ...]
    frequency: Tuple[str, ...]
    image_count: Tuple[int, ...]
    instance_count: Tuple[int, ...]
    # True when image/instance counts were counted from this json's annotations because its
    # categories lack them (then they are THIS split's statistics, not necessarily train's).
    counted_from_annotations: bool
    # The "<folder>/<file name>" end of every image's coco_url (the loader reads image_root + it).
    image_files: Tuple[str, ...] = ()
    # Ids of the categories without a valid "frequency" field (LVIS's evaluation needs it).
    missing_frequency: Tuple[int, ...] = ()
    # Annotations dropped for invalid values (DATASETS.DROP_INVALID_ANNOTATIONS); json_file is
    # then the cleaned copy that the loader and the evaluation read.
    dropped: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.thing_classes)

    def metadata(self) -> dict:
        """MetadataCatalog fields (``class_image_count`` as in detectron2 >= 0.6 main)."""
        return {
            "thing_classes": list(self.thing_classes),
            "class_frequency": list(self.frequency),
            "class_image_count": [
                {"id": k + 1, "image_count": n} for k, n in enumerate(self.image_count)
            ],
            "image_count": list(self.image_count),
            "instance_count": list(self.instance_count),
        }


def category_info_from_dict(data: dict, json_file: str, dropped: int = 0) -> LVISCategoryInfo:
    cats = sorted(data["categories"], key=lambda c: c["id"])
    k = len(cats)
    has_counts = all("image_count" in c and "instance_count" in c for c in cats)
    if has_counts:
        image_count = [int(c["image_count"]) for c in cats]
        instance_count = [int(c["instance_count"]) for c in cats]
    else:
        image_count, instance_count = counts_from_annotations(k, data.get("annotations", []))
    if all(c.get("frequency") in ("r", "c", "f") for c in cats):
        frequency = [c["frequency"] for c in cats]
    else:
        frequency = [frequency_bucket(n) for n in image_count]
    return LVISCategoryInfo(
        json_file=json_file,
        thing_classes=tuple(str(c["name"]) for c in cats),
        frequency=tuple(frequency),
        image_count=tuple(image_count),
        instance_count=tuple(instance_count),
        counted_from_annotations=not has_counts,
        image_files=tuple(
            "/".join(im["coco_url"].split("/")[-2:]) for im in data.get("images", ())
        ),
        missing_frequency=tuple(c["id"] for c in cats if c.get("frequency") not in ("r", "c", "f")),
        dropped=dropped,
    )


_INFO_CACHE: Dict[tuple, LVISCategoryInfo] = {}


def lvis_category_info(
    json_file: str, dataset_name: Optional[str] = None, drop_invalid: bool = False
) -> LVISCategoryInfo:
    """Validated class list and statistics of an LVIS-format json (cached per file state).

    Only the small summary is cached, never the parsed json (LVIS train is ~1 GB). With
    ``drop_invalid``, annotations with invalid values are dropped; if there were any, the result's
    ``json_file`` is a cleaned copy (:func:`.validate.write_cleaned_json`) for the loader and the
    evaluation to read instead.
    """
    path = os.path.abspath(json_file)
    if not os.path.isfile(path):
        who = f" of dataset '{dataset_name}'" if dataset_name else ""
        raise FileNotFoundError(f"LVIS-format json{who} not found: '{json_file}'. {README_HINT}")
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size, bool(drop_invalid))
    if key not in _INFO_CACHE:
        data, dropped = _read_checked(path, dataset_name, drop_invalid)
        used = path
        if dropped:

            used = write_cleaned_json(data, path)
        _INFO_CACHE[key] = category_info_from_dict(data, used, dropped)
        if _INFO_CACHE[key].counted_from_annotations:
            logger.info("%s: categories lack image/instance counts; counted from annotations", path)
    return _INFO_CACHE[key]
