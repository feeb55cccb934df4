"""A generated long-tail semantic-segmentation dataset (``sem_seg_synth_lt_train`` / ``_val``),
built from the LVIS-like generator's ``"lvis"`` preset (:mod:`.synthetic`, docs/synthetic.md).

The renderer and image plans of ``lvis_synth_lt``: 60 object classes, 20 frequent parents and 40
fine-grained variants (a parent's shape and colour plus one painted detail), so a model trained on
the long-tailed data confuses a rare variant with its frequent look-alike. Each pixel is labelled
with the class of the object drawn there (the visible region, after occlusion) and every other pixel
with class 0, ``background``, the most frequent class as ADE20K's wall / sky / floor are. Class
c + 1 is the generator's class c. Three changes to the LVIS preset, for ADE20K's flatter pixel tail
and a tail a CPU stage one can learn: the variants' train images in one geometric run
(``variant_images``, 80 -> 10) instead of LVIS's common / rare buckets; larger objects
(``object_scale``), at most ``max_objects_per_image``; each variant textured over all its visible
pixels by its detail (``variant_texture``; parents stay solid). Measured pixel shares against
ADE20K's in docs/semantic_segmentation.md.

Layout under ``$DETECTRON2_DATASETS/sem_seg_synth_lt`` (ADEChallengeData2016-like)::

    images/{training,validation}/000001.jpg   annotations/{training,validation}/000001.png
    sem_seg_synth.json   (the generation parameters; written last: marks a complete dataset)

Generated on the first load (under a file lock), regenerated when the parameters or the generator
version differ. Everything is a pure function of the parameters.
"""

import fcntl
import functools
import json
import logging
import os
from typing import Dict, List, Optional

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools import mask as mask_util

from .synthetic import PRESETS, RenderSpec, datasets_root, plan_images, synthetic_styles
from .synthetic.render import render

__all__ = [
    "SEM_SEG_SYNTH_DATASETS",
    "SEM_SEG_SYNTH_SUBDIR",
    "generate_synthetic_sem_seg",
    "register_sem_seg_synth",
    "sem_seg_synth_classes",
]

logger = logging.getLogger(__name__)

SEM_SEG_SYNTH_SUBDIR = "sem_seg_synth_lt"
SEM_SEG_SYNTH_DATASETS = {"sem_seg_synth_lt_train": "train", "sem_seg_synth_lt_val": "val"}
SPLIT_FOLDERS = {"train": "training", "val": "validation"}
STAMP = "sem_seg_synth.json"
IGNORE_LABEL = 255
# Bump when the output for the same parameters changes.
VERSION = 2
DEFAULTS = {
    "seed": 0,
    "num_train_images": 700,
    "num_val_images": 100,
    "image_size": 128,
    "object_scale": 1.4,
    "max_objects_per_image": 6,
    "variant_images": (80, 10),
    "variant_texture": True,
}
# A variant's texture over all its visible pixels, by its detail (darker shade, period 6 px).
SHADE = 0.55
TEXTURES = {
    "bar": lambda yy, xx: (yy // 3) % 2 == 0,  # horizontal stripes
    "two_bars": lambda yy, xx: (xx // 3) % 2 == 0,  # vertical stripes
    "dot": lambda yy, xx: ((yy % 6) < 3) & ((xx % 6) < 3),  # a grid of squares
    "cross": lambda yy, xx: ((yy + xx) // 3) % 2 == 0,  # diagonal stripes
    "ring": lambda yy, xx: ((yy - xx) // 3) % 2 == 0,  # the other diagonal
}


def sem_seg_synth_classes() -> List[str]:
    """Class names: ``background`` then the generator's 60 classes (index = label value)."""
    return ["background"] + [s.name for s in synthetic_styles("lvis")]


def _label_map(objects, anns, h, w) -> np.ndarray:
    label = np.zeros((h, w), dtype=np.uint8)
    for i, polys, _area, _bbox in anns:
        # The polygons reproduce the visible mask exactly under pycocotools' rasterisation.
        rle = mask_util.merge(mask_util.frPyObjects(polys, h, w))
        label[mask_util.decode(rle) > 0] = objects[i] + 1
    return label


def _texture_variants(pixels, label, styles) -> np.ndarray:
    """``pixels`` with every variant's visible pixels (``label`` = its class) striped or dotted by
    its detail (:data:`TEXTURES`): a segmentation model labels every pixel of an object, and the
    detail at the object's centre is evidence for few of them. Parents stay solid, so a variant
    still has its parent's shape and colour (the look-alike)."""
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w]
    out = pixels.astype(np.float64)
    for value in np.unique(label):
        if value == 0:
            continue
        detail = styles[int(value) - 1].detail
        if detail in TEXTURES:
            out[(label == value) & TEXTURES[detail](yy, xx)] *= SHADE
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def generate_synthetic_sem_seg(out_dir: str, **params) -> Dict[str, int]:
    """Write the dataset (see the module docstring) to ``out_dir``; returns images per split.

    Args (keyword, defaults in ``DEFAULTS``): seed, num_train_images (>= 700: the "lvis" preset's
    frequent classes need > 100 train images), num_val_images, image_size (short side scale)."""
    p = {**DEFAULTS, **params}
    preset = PRESETS["lvis"]
    styles = synthetic_styles("lvis")
    plans = plan_images(
        preset="lvis",
        seed=p["seed"],
        num_train_images=p["num_train_images"],
        num_val_images=p["num_val_images"],
        image_size=p["image_size"],
        max_objects_per_image=p["max_objects_per_image"],
        variant_images=tuple(p["variant_images"]),
    )
    scale = p["image_size"] / 128.0 * p["object_scale"]
    spec = RenderSpec(
        min_size=preset.object_size[0] * scale,
        max_size=preset.object_size[1] * scale,
        min_visible_px=max(12, int(round(40 * scale**2))),
        min_visible_frac=preset.min_visible_frac,
        min_detail_visible=preset.min_detail_visible,
        texture_scale=scale,
    )
    sizes = {}
    for split_index, (split, folder) in enumerate(SPLIT_FOLDERS.items()):
        img_dir = os.path.join(out_dir, "images", folder)
        ann_dir = os.path.join(out_dir, "annotations", folder)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for k, plan in enumerate(plans[split]):
            rng = np.random.default_rng(np.random.SeedSequence([p["seed"], 7, split_index, k]))
            pixels, anns = render(plan.objects, styles, plan.height, plan.width, spec, rng)
            label = _label_map(plan.objects, anns, plan.height, plan.width)
            if p["variant_texture"]:
                pixels = _texture_variants(pixels, label, styles)
            stem = f"{k + 1:06d}"
            Image.fromarray(pixels).save(os.path.join(img_dir, stem + ".jpg"), quality=95)
            Image.fromarray(label).save(os.path.join(ann_dir, stem + ".png"))
        sizes[split] = len(plans[split])
    return sizes


def _expected(params) -> dict:
    # Through json, as the stamp is read back (tuples become lists).
    return json.loads(json.dumps({"version": VERSION, **DEFAULTS, **params}))


def _is_current(out_dir, expected) -> bool:
    try:
        with open(os.path.join(out_dir, STAMP)) as f:
            return json.load(f) == expected
    except (OSError, ValueError):
        return False


def ensure_sem_seg_synth(root: Optional[str] = None, **params) -> str:
    """Generate the dataset under ``root/sem_seg_synth_lt`` unless it is current; returns the
    folder. Safe when several processes start at once (exclusive file lock)."""
    out_dir = os.path.join(datasets_root(root), SEM_SEG_SYNTH_SUBDIR)
    expected = _expected(params)
    if _is_current(out_dir, expected):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".generate.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _is_current(out_dir, expected):
                stamp = os.path.join(out_dir, STAMP)
                if os.path.exists(stamp):
                    os.remove(stamp)  # first: a reader must never see a half-rewritten dataset
                logger.info("Generating the long-tail segmentation dataset in %s", out_dir)
                generate_synthetic_sem_seg(out_dir, **params)
                with open(stamp + ".tmp", "w") as f:
                    json.dump(expected, f)
                os.replace(stamp + ".tmp", stamp)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out_dir


def _load(split, root, params):
    out_dir = ensure_sem_seg_synth(root, **params)
    folder = SPLIT_FOLDERS[split]
    img_dir = os.path.join(out_dir, "images", folder)
    ann_dir = os.path.join(out_dir, "annotations", folder)
    records = []
    for name in sorted(os.listdir(ann_dir)):
        stem = os.path.splitext(name)[0]
        label_file = os.path.join(ann_dir, name)
        with Image.open(label_file) as im:  # reads the header only
            width, height = im.size
        records.append(
            {
                "file_name": os.path.join(img_dir, stem + ".jpg"),
                "sem_seg_file_name": label_file,
                # Not used by detectron2's semantic segmentation; names the image in batch logs.
                "image_id": int(stem) if stem.isdigit() else stem,
                "height": height,
                "width": width,
            }
        )
    return records


def register_sem_seg_synth(root: Optional[str] = None, **params) -> None:
    """Register ``sem_seg_synth_lt_train`` / ``_val`` (generated on the first load)."""
    root = os.path.abspath(datasets_root(root))
    out_dir = os.path.join(root, SEM_SEG_SYNTH_SUBDIR)
    for name, split in SEM_SEG_SYNTH_DATASETS.items():
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, functools.partial(_load, split, root, dict(params)))
        MetadataCatalog.get(name).set(
            stuff_classes=sem_seg_synth_classes(),
            image_root=os.path.join(out_dir, "images", SPLIT_FOLDERS[split]),
            sem_seg_root=os.path.join(out_dir, "annotations", SPLIT_FOLDERS[split]),
            evaluator_type="sem_seg",
            ignore_label=IGNORE_LABEL,
        )
