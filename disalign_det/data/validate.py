"""Value checks of LVIS-format data: annotation numbers, image sizes, image files, val categories.

:mod:`.lvis_json` checks the structure of a json (keys, ids, references); this module checks the
values that structure holds, vectorised with numpy (LVIS v1 train: 1.27M annotations, a few
seconds), and the files and fields the evaluation needs before any training starts:

* :func:`find_invalid_annotations`: per annotation, a bit mask of what is wrong (bbox not four
  finite numbers, w or h <= 0, outside its image beyond :data:`BORDER_TOLERANCE`; a polygon
  coordinate that is not a finite number; area not a finite number > 0); images whose width or
  height is not a positive number.
* :func:`apply_value_policy`: raise :class:`LVISValueError` listing the first offenders (file,
  index, id, what) and the total, or drop them with a logged count (``drop=True``,
  ``DATASETS.DROP_INVALID_ANNOTATIONS``).
* :func:`check_image_files`: one ``stat`` per image; an error lists the first missing files and
  how many in all.

The checks of a registered dataset as a whole (what ``tools/*train_net.py`` run before writing
anything) are in :mod:`.dataset_checks`; this module imports nothing of the package but
:mod:`.frequency`, so :mod:`.lvis_json` can use it.
"""

import hashlib
import json
import logging
import os
from itertools import chain
from operator import itemgetter
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "BORDER_TOLERANCE",
    "LVISFormatError",
    "LVISValueError",
    "README_HINT",
    "ImageFilesError",
    "apply_value_policy",
    "check_image_files",
    "cleaned_json_path",
    "find_invalid_annotations",
    "image_paths",
]

logger = logging.getLogger(__name__)

README_HINT = "See datasets/README.md for the expected layout and how to register LVIS-format data."


class LVISFormatError(ValueError):
    """An LVIS-format json lacks something detectron2's loader or LVISEval relies on."""


# Pixels a box may reach past the image border: annotation tools round and LVIS/COCO boxes that
# touch the border end up to a fraction of a pixel outside it.
BORDER_TOLERANCE = 1.0
# How many offenders an error message lists.
SHOW = 5
DROP_KEY = "DATASETS.DROP_INVALID_ANNOTATIONS"

# Bits of the per-annotation problem mask, and their wording.
_BBOX_TYPE, _BBOX_NONFINITE, _BBOX_W, _BBOX_H, _BBOX_OUT = 1, 2, 4, 8, 16
_POLY_TYPE, _POLY_NONFINITE, _AREA_TYPE, _AREA_NONFINITE, _AREA_LE0 = 32, 64, 128, 256, 512
_IMAGE_SIZE = 1024
_WORDS = {
    _BBOX_TYPE: "bbox holds a value that is not a number",
    _BBOX_NONFINITE: "bbox is not finite",
    _BBOX_W: "bbox width <= 0",
    _BBOX_H: "bbox height <= 0",
    _BBOX_OUT: f"bbox outside its image (beyond {BORDER_TOLERANCE} px)",
    _POLY_TYPE: "polygon holds a value that is not a number",
    _POLY_NONFINITE: "polygon coordinate is not finite",
    _AREA_TYPE: "area is not a number",
    _AREA_NONFINITE: "area is not finite",
    _AREA_LE0: "area <= 0",
    _IMAGE_SIZE: "its image's width/height is not a positive number",
}
_NUMBER_TYPES = (int, float)


class LVISValueError(LVISFormatError):
    """Annotations or images of an LVIS-format json hold invalid values (NaN, w <= 0, ...)."""


class ImageFilesError(FileNotFoundError):
    """Images of a dataset are not where detectron2's loader will look for them."""


def _sums(rows):
    """(N,) float64 sum of each row of numbers, or None if a row holds a non-number.

    One C-level pass: a NaN or infinity anywhere in a row makes its sum non-finite, and ``sum``
    raises TypeError on a string, None or a list. (json's ``true``/``false`` are ints to ``sum``:
    polygons are checked this way, the LVIS train json has ~100M coordinates; boxes, areas and
    image sizes also by type, :func:`_rows_ok`.)"""
    try:
        return np.fromiter(map(sum, rows), dtype=np.float64, count=len(rows))
    except TypeError:
        return None


def _numbers_mask(rows) -> np.ndarray:
    """(N,) bool: row i holds only int/float values (the slow path, run only if one does not)."""
    return np.fromiter(
        (all(type(v) in _NUMBER_TYPES for v in r) for r in rows), dtype=bool, count=len(rows)
    )


def _float_rows(rows, ok: np.ndarray, width: int) -> np.ndarray:
    """(N, width) float64 of ``rows`` (NaN where a row is not all numbers)."""
    if ok.all():
        flat = chain.from_iterable(rows)
        return np.fromiter(flat, dtype=np.float64, count=len(rows) * width).reshape(-1, width)
    out = np.full((len(rows), width), np.nan)
    idx = np.flatnonzero(ok)
    if len(idx):
        out[idx] = np.asarray([rows[i] for i in idx], dtype=np.float64).reshape(-1, width)
    return out


def _rows_ok(rows) -> np.ndarray:
    """(N,) bool: row i holds only numbers (json's true/false excluded). One C-level pass over the
    types; per-value Python only if a non-number is somewhere."""
    if set(map(type, chain.from_iterable(rows))) <= set(_NUMBER_TYPES):
        return np.ones(len(rows), bool)
    return _numbers_mask(rows)


def _image_sizes(images) -> Tuple[np.ndarray, np.ndarray]:
    """(M, 2) float64 (width, height), NaN where not a number; (M,) bool: size is invalid."""
    rows = [(im["width"], im["height"]) for im in images]
    ok = _rows_ok(rows)
    wh = _float_rows(rows, ok, 2)
    with np.errstate(invalid="ignore"):
        bad = ~ok | ~np.isfinite(wh).all(1) | (wh <= 0).any(1)
    return wh, bad


def find_invalid_annotations(data: dict) -> Tuple[np.ndarray, np.ndarray]:
    """Problems of every annotation (and image size) of a structurally valid LVIS-format dict.

    Vectorised: a few C-level passes over the values (``map(sum, ...)``, ``numpy``), per-value
    Python only for rows that hold a non-number.

    Returns:
        (N,) int64 bit mask per annotation (0: valid; see ``_WORDS``), and (M,) bool per image:
        width or height is not a positive finite number.
    """
    images, anns = data["images"], data["annotations"]
    n = len(anns)
    problems = np.zeros(n, dtype=np.int64)
    wh, bad_image = _image_sizes(images)
    if n == 0:
        return problems, bad_image
    # Boxes: the structural check made each a list of 4.
    boxes = list(map(itemgetter("bbox"), anns))
    ok = _rows_ok(boxes)
    b = _float_rows(boxes, ok, 4)
    problems[~ok] |= _BBOX_TYPE
    finite = np.isfinite(b).all(1)
    problems[ok & ~finite] |= _BBOX_NONFINITE
    image_ids = np.asarray([im["id"] for im in images])
    order = np.argsort(image_ids, kind="stable")
    # Annotations point at existing images (structural check): searchsorted finds each one.
    img = order[
        np.searchsorted(image_ids[order], np.asarray(list(map(itemgetter("image_id"), anns))))
    ]
    size = wh[img]
    tol = BORDER_TOLERANCE
    with np.errstate(invalid="ignore"):
        problems[finite & (b[:, 2] <= 0)] |= _BBOX_W
        problems[finite & (b[:, 3] <= 0)] |= _BBOX_H
        outside = (
            (b[:, 0] < -tol)
            | (b[:, 1] < -tol)
            | (b[:, 0] + b[:, 2] > size[:, 0] + tol)
            | (b[:, 1] + b[:, 3] > size[:, 1] + tol)
        )
    problems[finite & ~bad_image[img] & outside] |= _BBOX_OUT
    problems[bad_image[img]] |= _IMAGE_SIZE
    # Polygons: the structural check made each segmentation a list of lists of even length >= 6.
    segs = list(map(itemgetter("segmentation"), anns))
    per_ann = np.fromiter(map(len, segs), dtype=np.int64, count=n)
    owner = np.repeat(np.arange(n), per_ann)  # annotation of each polygon
    polys = list(chain.from_iterable(segs))
    sums = _sums(polys)
    if sums is not None:
        problems[np.unique(owner[~np.isfinite(sums)])] |= _POLY_NONFINITE
    else:
        numbers = _numbers_mask(polys)  # the slow path: a non-number is somewhere
        problems[owner[~numbers]] |= _POLY_TYPE
        idx = np.flatnonzero(numbers)
        sums = _sums([polys[i] for i in idx])
        problems[owner[idx[~np.isfinite(sums)]]] |= _POLY_NONFINITE
    # Area.
    areas = list(map(itemgetter("area"), anns))
    if set(map(type, areas)) <= set(_NUMBER_TYPES):
        ok, area = np.ones(n, bool), np.fromiter(areas, dtype=np.float64, count=n)
    else:
        ok = np.fromiter((type(a) in _NUMBER_TYPES for a in areas), dtype=bool, count=n)
        area = np.array([a if k else np.nan for a, k in zip(areas, ok)], dtype=np.float64)
    problems[~ok] |= _AREA_TYPE
    finite = np.isfinite(area)
    problems[ok & ~finite] |= _AREA_NONFINITE
    with np.errstate(invalid="ignore"):
        problems[finite & (area <= 0)] |= _AREA_LE0
    return problems, bad_image


def _describe(bits: int) -> str:
    return "; ".join(w for bit, w in _WORDS.items() if bits & bit)


def _image_size_error(data, bad_image, json_file) -> LVISValueError:
    idx = np.flatnonzero(bad_image)
    lines = [
        f"  images[{i}] (id={data['images'][i]['id']!r}): width={data['images'][i]['width']!r}, "
        f"height={data['images'][i]['height']!r}"
        for i in idx[:SHOW]
    ]
    return LVISValueError(
        f"{json_file}: {len(idx)} image(s) have a width or height that is not a positive number "
        f"(first {min(SHOW, len(idx))} shown):\n" + "\n".join(lines) + "\nFix the json: the "
        "image sizes place every box and mask (this is never dropped automatically)."
    )


def apply_value_policy(
    data: dict, json_file: str, drop: bool = False, dataset_name: Optional[str] = None
) -> Tuple[dict, int]:
    """Check the values of ``data`` (structurally valid); raise or drop.

    Returns:
        ``(data, n_dropped)``: ``data`` itself when nothing is wrong, else (``drop=True``) a
        shallow copy whose ``annotations`` lack the invalid ones. Images with an invalid size
        always raise.

    Raises:
        LVISValueError: listing the first :data:`SHOW` offenders (index, id, what is wrong, the
        values) and how many in all.
    """
    problems, bad_image = find_invalid_annotations(data)
    if bad_image.any():
        raise _image_size_error(data, bad_image, json_file)
    bad = np.flatnonzero(problems)
    if len(bad) == 0:
        return data, 0
    anns = data["annotations"]
    who = f" (dataset '{dataset_name}')" if dataset_name else ""
    if drop:
        keep = problems == 0
        logger.warning(
            "%s%s: dropped %d of %d annotation(s) with invalid values (%s True); first: %s",
            json_file,
            who,
            len(bad),
            len(anns),
            DROP_KEY,
            "; ".join(f"annotations[{i}] (id={anns[i]['id']!r}): {_describe(problems[i])}"
                      for i in bad[:3]),
        )  # fmt: skip
        cleaned = dict(data)
        cleaned["annotations"] = [a for a, k in zip(anns, keep) if k]
        return cleaned, int(len(bad))
    lines = []
    for i in bad[:SHOW]:
        a = anns[i]
        lines.append(
            f"  annotations[{i}] (id={a['id']!r}, image_id={a['image_id']!r}): "
            f"{_describe(problems[i])} (bbox={a['bbox']!r}, area={a['area']!r})"
        )
    raise LVISValueError(
        f"{json_file}{who}: {len(bad)} of {len(anns)} annotation(s) have invalid values (first "
        f"{len(lines)} shown):\n" + "\n".join(lines) + f"\nFix the json, or set {DROP_KEY} True "
        "to drop them (DATASETS.LVIS_FORMAT datasets; the count is logged)."
    )


def cleaned_json_path(json_file: str) -> str:
    """Where the copy of ``json_file`` without its invalid annotations goes: a cache folder
    (``$DISALIGN_CACHE_DIR`` or ``$XDG_CACHE_HOME/disalign-det``), keyed by the source file's path,
    size and modification time, never next to the user's data."""
    root = os.environ.get("DISALIGN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "disalign-det"
    )
    st = os.stat(json_file)
    key = f"{os.path.abspath(json_file)}:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(json_file))[0]
    return os.path.join(root, "clean_json", f"{stem}.{digest}.json")


def write_cleaned_json(data: dict, json_file: str) -> str:
    """Write ``data`` (the cleaned dict of ``json_file``) once to :func:`cleaned_json_path`
    (atomically: processes starting together write the same bytes); returns that path."""
    path = cleaned_json_path(json_file)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    logger.info("%s: the evaluation and the loader read the cleaned copy %s", json_file, path)
    return path


# --------------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------------


def image_paths(image_files: Sequence[str], image_root: str) -> List[str]:
    """The paths detectron2's LVIS loader reads: ``image_root + <folder>`` joined with the file
    name, ``image_files`` being the ``<folder>/<file name>`` ends of the images' ``coco_url``."""
    out = []
    for rel in image_files:
        folder, name = rel.rsplit("/", 1)
        out.append(os.path.join(image_root + folder, name))
    return out


def check_image_files(paths: Sequence[str], json_file: str, image_root: str) -> None:
    """One ``stat`` per path; :class:`ImageFilesError` listing the first missing ones and how
    many in all."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = "\n".join(f"  {p}" for p in missing[:SHOW])
        raise ImageFilesError(
            f"{len(missing)} of {len(paths)} image(s) of {json_file} not found (first "
            f"{min(SHOW, len(missing))} shown):\n{shown}\ndetectron2's LVIS loader reads "
            f"image_root ('{image_root}') + the folder and file name of each image's coco_url. "
            f"{README_HINT}"
        )
