"""Per-class training pixel counts n_c of semantic-segmentation datasets, for GRW's
r_c = n_c / sum_k n_k and the long-tail groups of the evaluation.

Counting decodes every label PNG (ADE20K train: 20,210 of them), so it runs once per dataset in
parallel processes and is cached on disk, keyed by the content of the PNGs (a hash of their bytes,
the class count and the ignore label): a changed or added label map gives a new key. Reading the
bytes to hash them is much cheaper than decoding them. ADE20K also publishes the ratios r_c
(``objectInfo150.csv``), which :func:`read_pixel_ratios` reads instead.
"""

import csv
import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

__all__ = [
    "count_label_pixels",
    "pixel_counts",
    "pixel_counts_from_cfg",
    "pixel_counts_cache_dir",
    "read_pixel_ratios",
]

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1
_CHUNK = 64


def pixel_counts_cache_dir() -> str:
    """``$DISALIGN_CACHE_DIR/pixel_counts`` or ``${XDG_CACHE_HOME:-~/.cache}/disalign-det/...``."""
    base = os.environ.get("DISALIGN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "disalign-det"
    )
    return os.path.join(base, "pixel_counts")


def _count_files(args):
    files, num_classes, ignore_label = args
    total = np.zeros(num_classes, dtype=np.int64)
    for path in files:
        try:
            label = np.asarray(Image.open(path))
        except Exception as e:
            raise RuntimeError(f"Cannot read label map {path!r}: {type(e).__name__}: {e}") from e
        if label.ndim != 2:
            raise ValueError(f"Label map {path!r} has shape {label.shape}, expected (H, W)")
        values = label.ravel()
        bad = (values >= num_classes) & (values != ignore_label)
        if bad.any():
            raise ValueError(
                f"Label map {path!r} holds label {int(values[bad][0])}, outside [0, "
                f"{num_classes}) and not the ignore label {ignore_label}: check "
                "MODEL.SEM_SEG_HEAD.NUM_CLASSES / IGNORE_VALUE"
            )
        total += np.bincount(values[values != ignore_label], minlength=num_classes)[:num_classes]
    return total


def count_label_pixels(files: Sequence[str], num_classes: int, ignore_label: int, workers=1):
    """(C,) int64 pixel count of each class over the label PNGs ``files`` (``ignore_label`` not
    counted), with ``workers`` processes (1: in this process)."""
    chunks = [
        (list(files[i : i + _CHUNK]), num_classes, ignore_label)
        for i in range(0, len(files), _CHUNK)
    ]
    if workers <= 1 or len(chunks) <= 1:
        parts = map(_count_files, chunks)
        return sum(parts, np.zeros(num_classes, dtype=np.int64))
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        return sum(pool.map(_count_files, chunks), np.zeros(num_classes, dtype=np.int64))


def _content_key(files, num_classes, ignore_label) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION} {num_classes} {ignore_label} {len(files)}".encode())
    for path in sorted(files):
        with open(path, "rb") as f:
            h.update(hashlib.sha1(f.read()).digest())
    return h.hexdigest()[:32]


def pixel_counts(files, num_classes: int, ignore_label: int, workers: int = 0, cache=True):
    """:func:`count_label_pixels` of ``files``, cached by their content (see the module
    docstring). ``workers`` 0: one process per CPU core. Returns (C,) int64."""
    files = list(files)
    if not files:
        raise ValueError("No label maps to count pixels in")
    key = _content_key(files, num_classes, ignore_label) if cache else None
    path = os.path.join(pixel_counts_cache_dir(), f"{key}.json") if cache else None
    if cache and os.path.isfile(path):
        with open(path) as f:
            counts = np.asarray(json.load(f)["counts"], dtype=np.int64)
        if counts.shape == (num_classes,):
            logger.info("Pixel counts of %d label maps read from the cache %s", len(files), path)
            return counts
    workers = workers or os.cpu_count() or 1
    logger.info("Counting the pixels of %d label maps (%d processes)", len(files), workers)
    counts = count_label_pixels(files, num_classes, ignore_label, workers)
    if cache:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"num_files": len(files), "counts": counts.tolist()}, f)
        os.replace(tmp, path)  # atomic: another process reading it sees all or nothing
    return counts


def read_pixel_ratios(path: str, num_classes: int) -> np.ndarray:
    """(C,) pixel ratios r_c from ADE20K's ``objectInfo150.csv`` / ``.txt`` (header row, columns
    Idx (1-based), Ratio, ...; comma- or tab-separated), ordered by Idx."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.DISALIGN.PIXEL_RATIOS_FILE {path!r} does not exist")
    with open(path, newline="") as f:
        text = f.read()
    delimiter = "\t" if "\t" in text.splitlines()[0] else ","
    rows = list(csv.reader(text.splitlines(), delimiter=delimiter))
    header = [h.strip().lower() for h in rows[0]]
    if "idx" not in header or "ratio" not in header:
        raise ValueError(
            f"MODEL.DISALIGN.PIXEL_RATIOS_FILE {path!r}: expected a header with Idx and Ratio "
            f"columns (ADE20K's objectInfo150), got {rows[0]}"
        )
    i_idx, i_ratio = header.index("idx"), header.index("ratio")
    ratios = {int(r[i_idx]): float(r[i_ratio]) for r in rows[1:] if r}
    if sorted(ratios) != list(range(1, num_classes + 1)):
        raise ValueError(
            f"MODEL.DISALIGN.PIXEL_RATIOS_FILE {path!r} has classes {min(ratios)}..{max(ratios)} "
            f"({len(ratios)}), MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes}"
        )
    return np.array([ratios[i + 1] for i in range(num_classes)], dtype=np.float64)


def dataset_pixel_counts(names, num_classes, ignore_label, workers=0) -> np.ndarray:
    """(C,) training pixel counts of the registered datasets ``names`` (their dicts'
    ``sem_seg_file_name``)."""
    files = []
    for name in names:
        for d in DatasetCatalog.get(name):
            if "sem_seg_file_name" not in d:
                raise ValueError(
                    f"Dataset {name!r} (DATASETS.TRAIN) record {d.get('file_name')!r} has no "
                    "sem_seg_file_name: not a semantic-segmentation dataset"
                )
            files.append(d["sem_seg_file_name"])
    return pixel_counts(files, num_classes, ignore_label, workers)


def pixel_counts_from_cfg(cfg) -> np.ndarray:
    """n_c of ``cfg``'s training data: the ratios of ``MODEL.DISALIGN.PIXEL_RATIOS_FILE`` (GRW only
    needs them up to a factor) or the counted pixels of ``DATASETS.TRAIN``. (C,) float64/int64."""
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        classes = MetadataCatalog.get(name).get("stuff_classes")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes} but dataset {name!r} has "
                f"{len(classes)} classes; set MODEL.SEM_SEG_HEAD.NUM_CLASSES {len(classes)}"
            )
    if cfg.MODEL.DISALIGN.PIXEL_RATIOS_FILE:
        return read_pixel_ratios(cfg.MODEL.DISALIGN.PIXEL_RATIOS_FILE, num_classes)
    return dataset_pixel_counts(
        cfg.DATASETS.TRAIN,
        num_classes,
        cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        cfg.MODEL.DISALIGN.PIXEL_COUNT_WORKERS,
    )
