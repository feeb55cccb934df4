"""A small, long-tailed, LVIS-format instance-segmentation dataset generated from a seed (library).

Real LVIS v1.0 needs ~25 GB and a GPU to say anything. This generator writes a dataset with the same
json schema (every LVIS v1 field), the same r/c/f frequency rule (on TRAIN image counts: rare 1-10,
common 11-100, frequent > 100) and the on-disk convention detectron2's LVIS loader expects, small
enough that a Mask R-CNN trained from scratch on a CPU learns it. Two presets (docs/synthetic.md):

``"basic"`` (default; the tiny fixture of the tests and ``lvis_synth_*``)
    20 classes, each a unique (shape, colour, texture) such as ``red_solid_circle``; 128 px square
    images of 1-6 objects; every class absent from an image is a verified negative.

``"lvis"`` (``lvis_synth_lt_*``)
    LVIS's structure (:mod:`.families`): 60 classes in LVIS v1.0's r/c/f
    proportions, every rare and common class a fine-grained variant of a frequent parent (same
    shape and colour, one painted detail more); landscape and portrait images of varying sizes;
    several classes per image; ``neg_category_ids`` a subset of the absent classes (always the
    absent relatives of the classes present, half the others), and ``not_exhaustive_category_ids``
    classes with instances drawn but left unannotated, as in LVIS.

Common to both: the val split contains every class (``min_val_images`` images each, so APr/APc/APf
are defined); objects may occlude earlier ones and an annotation is the object's VISIBLE mask after
all drawing, traced to polygons that reproduce it exactly, with ``area``/``bbox`` of the same mask.

Layout written under ``out_dir`` (``image_root`` is ``out_dir/images/``)::

    lvis_synth_train.json   lvis_synth_val.json
    images/train2017/000000000001.jpg ...   images/val2017/000000000701.jpg ...

``coco_url`` is ``http://synthetic.invalid/<split folder>/<file>`` because detectron2's LVIS loader
ignores ``file_name`` and builds ``image_root + <folder of coco_url> + <basename>``.

Everything is a pure function of the arguments: the same seed gives byte-identical json and images.
What each image holds is decided by a "plan" step that draws no pixels (:func:`plan_images`), so
:func:`synthetic_categories` gives the metadata of a dataset without rendering it.
"""

import inspect
import json
import logging
import os
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from ..frequency import frequency_bucket
from .plan import (
    DEFAULT_NUM_CLASSES,
    DEFAULT_NUM_TRAIN_IMAGES,
    DEFAULT_NUM_VAL_IMAGES,
    PRESETS,
    ImagePlan,
    _counts,
    _extras_rng,
    _image_plans,
    _image_rng,
    _plan_train,
    _plan_val,
    _preset,
    _Preset,
    class_styles,
    synthetic_styles,
)
from .render import COLOURS, DETAILS, SHAPES, TEXTURES, RenderSpec, SyntheticClass, render

__all__ = [
    "SHAPES",
    "COLOURS",
    "TEXTURES",
    "DETAILS",
    "PRESETS",
    "SyntheticClass",
    "ImagePlan",
    "class_styles",
    "synthetic_styles",
    "plan_images",
    "synthetic_categories",
    "generate_synthetic_lvis",
    "generation_params",
    "summarize",
    "GENERATOR_VERSION",
    "TRAIN_JSON",
    "VAL_JSON",
    "LT_DATASETS",
    "LT_SUBDIR",
    "DEFAULT_NUM_CLASSES",
    "DEFAULT_NUM_TRAIN_IMAGES",
    "DEFAULT_NUM_VAL_IMAGES",
]

logger = logging.getLogger(__name__)

TRAIN_JSON = "lvis_synth_train.json"
VAL_JSON = "lvis_synth_val.json"
IMAGES_DIR = "images"
SPLIT_FOLDERS = {"train": "train2017", "val": "val2017"}
URL_PREFIX = "http://synthetic.invalid"
# Where the built-in "lvis" preset dataset lives under $DETECTRON2_DATASETS, and its names.
LT_SUBDIR = "lvis_synth_lt"
LT_DATASETS = {"lvis_synth_lt_train": "train", "lvis_synth_lt_val": "val"}

# Bump whenever the output for the same parameters changes: a dataset generated on first use by an
# older version is then regenerated instead of silently reused.
GENERATOR_VERSION = 3


def _resolve(overrides: dict) -> dict:
    """Every parameter of :func:`generate_synthetic_lvis`, None replaced by the preset default."""
    sig = inspect.signature(generate_synthetic_lvis)
    params = {k: p.default for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise TypeError(f"unknown generator parameter(s) {unknown}; known: {sorted(params)}")
    params.update(overrides)
    preset = _preset(params["preset"])
    for key, value in params.items():
        if value is None:
            params[key] = getattr(preset, key)
    if params["num_train_images"] < 1 or params["num_val_images"] < 0:
        raise ValueError("num_train_images must be >= 1 and num_val_images >= 0")
    if params["max_objects_per_image"] < 1:
        raise ValueError(
            f"max_objects_per_image must be >= 1, got {params['max_objects_per_image']}"
        )
    return params


def plan_images(*, variant_images=None, **params) -> Dict[str, List[ImagePlan]]:
    """What :func:`generate_synthetic_lvis` (same arguments) draws in each image, per split.

    ``variant_images=(most, fewest)`` (``"lvis"`` preset only; not a parameter of the LVIS-format
    datasets): the variants' train images in one geometric run instead of LVIS's common / rare
    buckets (:func:`.families.family_profile`; the segmentation data's flatter tail)."""
    params = _resolve({k: v for k, v in params.items() if k != "generator_version"})
    preset = _preset(params["preset"])
    styles = synthetic_styles(params["preset"], params["num_classes"])
    train = _plan_train(params, preset, styles, variant_images)
    image_count, _ = _counts(train, len(styles))
    val = _plan_val(params, preset, image_count, [frequency_bucket(int(n)) for n in image_count])
    return {
        split: _image_plans(objs, preset, params, styles, split, _extras_rng(params["seed"], split))
        for split, objs in (("train", train), ("val", val))
    }


def _categories(styles: List[SyntheticClass], image_count, instance_count) -> List[dict]:
    return [
        {
            "id": k + 1,
            "name": st.name,
            "synonyms": [st.name, st.name.replace("_", " ")],
            "def": st.describe(),
            "synset": f"synthetic_{st.name}.n.01",
            "frequency": frequency_bucket(int(image_count[k])),
            "image_count": int(image_count[k]),
            "instance_count": int(instance_count[k]),
        }
        for k, st in enumerate(styles)
    ]


def synthetic_categories(
    *,
    seed: int = 0,
    num_classes: Optional[int] = None,
    num_train_images: Optional[int] = None,
    max_objects_per_image: Optional[int] = None,
    preset: str = "basic",
) -> List[dict]:
    """The ``categories`` list that :func:`generate_synthetic_lvis` writes, without rendering.

    The category statistics are the TRAIN split's annotations' and depend only on these arguments
    (not on the val size or the image size), so this is cheap (milliseconds) and exact.
    """
    params = _resolve(
        dict(
            seed=seed,
            preset=preset,
            num_classes=num_classes,
            num_train_images=num_train_images,
            max_objects_per_image=max_objects_per_image,
        )
    )
    preset_ = _preset(preset)
    styles = synthetic_styles(preset, params["num_classes"])
    train = _plan_train(params, preset_, styles)
    # Unannotated instances (drawn later, from another stream) are never counted: the "lvis"
    # preset only adds them, so these annotated counts are exact.
    return _categories(styles, *_counts(train, len(styles)))


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _write_json_atomic(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        # dumps, not dump: only the one-shot encoder is the fast C one.
        f.write(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)


def _render_spec(preset: _Preset, size: int) -> RenderSpec:
    scale = size / 128.0
    lo, hi = preset.object_size
    return RenderSpec(
        min_size=lo * scale,
        max_size=hi * scale,
        min_visible_px=max(12, int(round(40 * scale**2))),
        min_visible_frac=preset.min_visible_frac,
        min_detail_visible=preset.min_detail_visible,
        texture_scale=scale,
    )


def _split(split, plans, first_image_id, first_ann_id, styles, params, spec, image_dir):
    folder = SPLIT_FOLDERS[split]
    images, annotations = [], []
    ann_id = first_ann_id
    for k, plan in enumerate(plans):
        image_id = first_image_id + k
        rng = _image_rng(params["seed"], split, image_id)
        pixels, anns = render(plan.objects, styles, plan.height, plan.width, spec, rng)
        fname = f"{image_id:012d}.jpg"
        # 4:4:4 chroma keeps the colour of 14 px objects intact.
        Image.fromarray(pixels).save(
            os.path.join(image_dir, fname), quality=params["jpeg_quality"], subsampling=0
        )
        images.append(
            {
                "id": image_id,
                "width": plan.width,
                "height": plan.height,
                "file_name": f"{folder}/{fname}",
                "coco_url": f"{URL_PREFIX}/{folder}/{fname}",
                "flickr_url": "",
                "date_captured": "2021-06-19 00:00:00",
                "license": 1,
                # LVISEval counts a detection of class c as a false positive only where c is
                # annotated or a verified negative, and never on a not-exhaustive class.
                "neg_category_ids": [c + 1 for c in plan.neg],
                "not_exhaustive_category_ids": [c + 1 for c in plan.not_exhaustive],
            }
        )
        for i, polys, area, bbox in anns:
            if not plan.annotated[i]:
                continue
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": plan.objects[i] + 1,
                    "segmentation": polys,
                    "area": float(area),
                    "bbox": bbox,
                }
            )
            ann_id += 1
    return images, annotations


def generate_synthetic_lvis(
    out_dir: str,
    *,
    preset: str = "basic",
    seed: int = 0,
    num_classes: Optional[int] = None,
    num_train_images: Optional[int] = None,
    num_val_images: Optional[int] = None,
    image_size: Optional[int] = None,
    max_objects_per_image: Optional[int] = None,
    min_val_images: Optional[int] = None,
    jpeg_quality: int = 92,
) -> Dict[str, str]:
    """Write the synthetic LVIS-format dataset under ``out_dir`` (see the module docstring).

    Args:
        out_dir: output folder (created).
        preset: ``"basic"`` or ``"lvis"``; None arguments below take the preset's default
            (basic: 20 classes, 700/160 images, 128 px, 6 objects, 3 val images per class;
            lvis: 60 classes, 1000/200 images, 128 px, 8 objects, 4 val images per class).
        seed: everything (classes' frequencies, layouts, pixels) is a function of it.
        num_classes: K, categories get ids 1..K.
        num_train_images / num_val_images: split sizes. A class can only be "frequent" (> 100
            train images) when num_train_images > 100.
        image_size: basic: the side of the square images; lvis: the largest short side (short
            sides vary over 75-100% of it, aspect ratios over 1-1.6, either orientation). Object
            sizes scale with it (basic 14-50 px, lvis 20-48 px at 128).
        max_objects_per_image: at most this many objects per image (at least one).
        min_val_images: each class appears in at least this many val images.
        jpeg_quality: JPEG quality of the images.

    Returns:
        dict with ``out_dir``, ``train_json``, ``val_json``, ``image_root`` (ends with a separator,
        as detectron2's LVIS loader concatenates it with the split folder), ``train_image_dir`` and
        ``val_image_dir``.
    """
    params = generation_params(
        preset=preset,
        seed=seed,
        num_classes=num_classes,
        num_train_images=num_train_images,
        num_val_images=num_val_images,
        image_size=image_size,
        max_objects_per_image=max_objects_per_image,
        min_val_images=min_val_images,
        jpeg_quality=jpeg_quality,
    )
    plans = plan_images(**params)
    styles = synthetic_styles(preset, params["num_classes"])
    spec = _render_spec(_preset(preset), params["image_size"])

    paths = {
        "out_dir": out_dir,
        "train_json": os.path.join(out_dir, TRAIN_JSON),
        "val_json": os.path.join(out_dir, VAL_JSON),
        "image_root": os.path.join(out_dir, IMAGES_DIR, ""),
        "train_image_dir": os.path.join(out_dir, IMAGES_DIR, SPLIT_FOLDERS["train"]),
        "val_image_dir": os.path.join(out_dir, IMAGES_DIR, SPLIT_FOLDERS["val"]),
    }
    os.makedirs(paths["train_image_dir"], exist_ok=True)
    os.makedirs(paths["val_image_dir"], exist_ok=True)
    licenses = [{"id": 1, "name": "CC0 1.0 (synthetic images)", "url": ""}]
    train_imgs, train_anns = _split(
        "train", plans["train"], 1, 1, styles, params, spec, paths["train_image_dir"]
    )
    val_imgs, val_anns = _split(
        "val",
        plans["val"],
        params["num_train_images"] + 1,
        len(train_anns) + 1,
        styles,
        params,
        spec,
        paths["val_image_dir"],
    )
    categories = _categories(styles, *_counts_from_annotations(train_anns, len(styles)))
    # The jsons are written last (atomically): their presence means the images are complete.
    for split, imgs, anns in (("train", train_imgs, train_anns), ("val", val_imgs, val_anns)):
        data = {
            "info": {
                "description": f"disalign-det synthetic long-tailed LVIS-format dataset ({split})",
                "version": "1.0",
                "year": 2021,
                "contributor": "disalign_det.data.synthetic",
                "date_created": "2021-06-19",
                "synthetic_params": params,
            },
            "licenses": licenses,
            "images": imgs,
            "annotations": anns,
            # As in LVIS, both splits carry the TRAIN statistics in their categories.
            "categories": categories,
        }
        _write_json_atomic(data, paths[f"{split}_json"])
    logger.info(
        "Synthetic LVIS dataset (%s) in %s: %d/%d train/val images, %d/%d annotations",
        preset,
        out_dir,
        len(train_imgs),
        len(val_imgs),
        len(train_anns),
        len(val_anns),
    )
    return paths


def _counts_from_annotations(anns, k):
    # From what was written, so the categories can never disagree with the annotations.
    image_count = np.zeros(k, dtype=np.int64)
    instance_count = np.zeros(k, dtype=np.int64)
    seen = set()
    for a in anns:
        c = a["category_id"] - 1
        instance_count[c] += 1
        if (a["image_id"], c) not in seen:
            seen.add((a["image_id"], c))
            image_count[c] += 1
    return image_count, instance_count


def generation_params(**overrides) -> dict:
    """Every parameter of :func:`generate_synthetic_lvis` (defaults updated with ``overrides``, None
    replaced by the preset's default) plus ``generator_version``: what ``info["synthetic_params"]``
    of the jsons records, so that a dataset generated by other parameters or an older generator can
    be recognised."""
    params = _resolve(overrides)
    synthetic_styles(params["preset"], params["num_classes"])  # range check
    params["generator_version"] = GENERATOR_VERSION
    return params


def summarize(paths: Dict[str, str]) -> str:
    """A few lines on a generated dataset: sizes, classes present, r/c/f buckets and counts."""
    lines = []
    for split in ("train", "val"):
        with open(paths[f"{split}_json"]) as f:
            data = json.load(f)
        per_cls: Dict[int, set] = {}
        for a in data["annotations"]:
            per_cls.setdefault(a["category_id"], set()).add(a["image_id"])
        orient = sum(im["width"] > im["height"] for im in data["images"])
        portrait = sum(im["width"] < im["height"] for im in data["images"])
        lines.append(
            f"{split}: {len(data['images'])} images ({orient} landscape, {portrait} portrait), "
            f"{len(data['annotations'])} annotations, "
            f"{len(per_cls)}/{len(data['categories'])} classes present"
        )
    cats = data["categories"]
    for b, label in (
        ("f", "frequent (>100 train images)"),
        ("c", "common (11-100)"),
        ("r", "rare (1-10)"),
    ):
        members = [c for c in cats if c["frequency"] == b]
        counts = ", ".join(
            str(c["image_count"]) for c in sorted(members, key=lambda c: -c["image_count"])
        )
        lines.append(f"{label}: {len(members)} classes; train image counts: {counts}")
    return "\n".join(lines)
