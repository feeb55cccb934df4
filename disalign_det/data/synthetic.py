"""A small, long-tailed, LVIS-format instance-segmentation dataset generated from a seed.

Real LVIS v1.0 needs ~25 GB and a GPU to say anything. This generator writes a dataset with the same
json schema (every LVIS v1 field), the same r/c/f frequency rule and the same on-disk convention as
the detectron2 LVIS loader expects, but small enough that a Mask R-CNN trained from scratch on a CPU
learns it in about a thousand iterations:

* each class is a unique (shape, colour, texture) combination, e.g. ``red_solid_circle`` or
  ``green_striped_star``, drawn with a random size, position and a small rotation on a noisy
  gradient background, 1-6 objects per image;
* the number of TRAIN images containing each class follows a long-tailed profile whose buckets are
  LVIS's: rare 1-10 images, common 11-100, frequent > 100 (with the defaults: 5 frequent, 8 common
  and 7 rare classes out of 20);
* the val split contains every class (at least ``min_val_images`` images each), so APr, APc and APf
  are all defined;
* objects may occlude earlier ones; an annotation is the object's VISIBLE mask after all drawing,
  traced to polygons that reproduce that mask exactly, with ``area``/``bbox`` of the same mask.

Layout written under ``out_dir`` (``image_root`` is ``out_dir/images/``)::

    lvis_synth_train.json   lvis_synth_val.json
    images/train2017/000000000001.jpg ...   images/val2017/000000000701.jpg ...

``coco_url`` is ``http://synthetic.invalid/<split folder>/<file>`` because detectron2's LVIS loader
ignores ``file_name`` and builds ``image_root + <folder of coco_url> + <basename>``.

Everything is a pure function of the arguments: the same seed gives byte-identical json and images.
The train class statistics (and so the category list with its r/c/f buckets) are decided by a cheap
"plan" step that draws no pixels, so :func:`synthetic_categories` can give the metadata of a dataset
without rendering it.

CLI::

    python -m disalign_det.data.synthetic --out datasets/lvis_synth --seed 0
"""

import argparse
import functools
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
from PIL import Image

from .frequency import frequency_bucket

__all__ = [
    "SHAPES",
    "COLOURS",
    "TEXTURES",
    "SyntheticClass",
    "class_styles",
    "synthetic_categories",
    "generate_synthetic_lvis",
    "generation_params",
    "GENERATOR_VERSION",
    "TRAIN_JSON",
    "VAL_JSON",
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

DEFAULT_NUM_CLASSES = 20
DEFAULT_NUM_TRAIN_IMAGES = 700
DEFAULT_NUM_VAL_IMAGES = 160
DEFAULT_IMAGE_SIZE = 128
DEFAULT_MAX_OBJECTS = 6
# Bump whenever the output for the same parameters changes: a dataset generated on first use by an
# older version is then regenerated instead of silently reused.
GENERATOR_VERSION = 2

# Shapes chosen to stay recognisable at 14 px and to be simply connected (a polygon list cannot
# carry holes, so the ring is an open "C" and there is no hollow square).
SHAPES = (
    "circle",
    "square",
    "triangle",
    "c_ring",
    "plus",
    "star",
    "ellipse",
    "diamond",
    "half_disc",
    "crescent",
)
# Saturated colours, far apart in RGB, all clearly off the grey background.
COLOURS = (
    ("red", (220, 45, 45)),
    ("green", (45, 190, 65)),
    ("blue", (55, 95, 235)),
    ("yellow", (235, 215, 45)),
    ("magenta", (215, 60, 205)),
    ("cyan", (50, 210, 220)),
    ("orange", (245, 140, 30)),
    ("white", (240, 240, 240)),
)
TEXTURES = ("solid", "striped", "dotted")

# Share of the classes in the frequent / rare buckets of the default profile; the rest are common.
_FREQUENT_SHARE = 0.25
_RARE_SHARE = 0.35
# Probability of one more instance of a class already in an image (drawn repeatedly), by bucket:
# frequent classes are also the ones with many instances per image, as in LVIS.
_P_EXTRA_INSTANCE = {"f": 0.45, "c": 0.3, "r": 0.2}
# Distinct classes per image at most (the remaining object slots go to extra instances).
_MAX_CLASSES_PER_IMAGE = 4
_LAYOUT_ATTEMPTS = 60


@dataclass(frozen=True)
class SyntheticClass:
    """Appearance of one synthetic class."""

    name: str
    shape: str
    colour: str
    rgb: tuple
    texture: str


def class_styles(num_classes: int) -> List[SyntheticClass]:
    """The (shape, colour, texture) of classes ``0..num_classes-1``, all distinct.

    Class ``k`` cycles through the shapes while the colour advances by one per class and by one
    more per round of shapes; the texture advances per round. So neighbouring classes differ in
    shape AND colour, and two classes with the same shape differ in colour or texture.
    """
    s, c, t = len(SHAPES), len(COLOURS), len(TEXTURES)
    if not 1 <= num_classes <= s * c * t:
        raise ValueError(f"num_classes must be in [1, {s * c * t}], got {num_classes}")
    styles = []
    for k in range(num_classes):
        block, j = divmod(k, s * c)
        rnd, shape = divmod(j, s)
        # len(SHAPES) + 1 and len(COLOURS) are coprime: within a block of s * c classes, the
        # colours of one shape are all different.
        colour = (j + rnd) % c
        texture = (block + rnd) % t
        cname, rgb = COLOURS[colour]
        name = f"{cname}_{TEXTURES[texture]}_{SHAPES[shape]}"
        styles.append(SyntheticClass(name, SHAPES[shape], cname, rgb, TEXTURES[texture]))
    return styles


# --------------------------------------------------------------------------------------------------
# Plan: which classes (and how many instances) each image holds. No pixels are drawn here.
# --------------------------------------------------------------------------------------------------


def _rng_streams(seed: int):
    # Independent streams, so that e.g. changing the val size never changes the train split.
    train_plan, val_plan = np.random.SeedSequence([seed, 0]).spawn(2)
    return np.random.default_rng(train_plan), np.random.default_rng(val_plan)


def _image_rng(seed: int, split: str, image_id: int):
    # One stream per image: an image's pixels do not depend on how many images precede it.
    return np.random.default_rng(
        np.random.SeedSequence([seed, 1, 0 if split == "train" else 1, image_id])
    )


def _geom_counts(hi: float, lo: float, n: int) -> List[int]:
    if n <= 0:
        return []
    return [int(round(v)) for v in np.geomspace(hi, lo, n)]


def _train_profile(num_classes: int, num_images: int, rng) -> np.ndarray:
    """Target number of train images per class: a long tail spanning LVIS's three buckets."""
    if num_classes < 3:
        raise ValueError(f"num_classes must be >= 3 (one per r/c/f bucket), got {num_classes}")
    n_f = max(1, int(round(_FREQUENT_SHARE * num_classes)))
    n_r = max(1, int(round(_RARE_SHARE * num_classes)))
    n_c = max(1, num_classes - n_f - n_r)
    n_r = num_classes - n_f - n_c
    # Frequent: from half the images down to 110 (>100); common 90 -> 12; rare 10 -> 2 (a class
    # seen in a single training image teaches nothing measurable at this scale).
    frequent = _geom_counts(max(110.0, 0.5 * num_images), 110.0, n_f)
    common = _geom_counts(90.0, 12.0, n_c)
    rare = _geom_counts(10.0, 2.0, n_r)
    ranked = np.clip(np.array(frequent + common + rare, dtype=np.int64), 1, num_images)
    # Every image needs at least one object: top up the frequent classes if the tail is too thin.
    deficit = num_images - int(ranked.sum())
    i = 0
    while deficit > 0:
        room = num_images - ranked[i % n_f]
        add = min(room, deficit)
        ranked[i % n_f] += add
        deficit -= add
        i += 1
    # Which class gets which rank is random (as in LVIS, where ids are alphabetical).
    counts = np.empty(num_classes, dtype=np.int64)
    counts[rng.permutation(num_classes)] = ranked
    return counts


def _assign(counts: np.ndarray, num_images: int, max_objects: int, rng) -> List[List[int]]:
    """Distinct classes of each image such that class ``c`` is in exactly ``counts[c]`` images."""
    cap = min(_MAX_CLASSES_PER_IMAGE, max_objects)
    too_many = (
        f"{int(counts.sum())} (image, class) pairs do not fit in {num_images} images of at most "
        f"{cap} classes: use more images, fewer classes or a larger max_objects_per_image"
    )
    if counts.sum() > cap * num_images:
        raise ValueError(too_many)
    sets: List[List[int]] = [[] for _ in range(num_images)]
    fill = np.zeros(num_images, dtype=np.int64)
    # Most frequent first: they need the most room. Stable order makes ties deterministic.
    for c in np.argsort(-counts, kind="stable"):
        avail = np.flatnonzero(fill < cap)
        if len(avail) < counts[c]:  # only close to full capacity
            raise ValueError(too_many)
        # Favour emptier images, which spreads the classes and leaves few images empty.
        w = (cap - fill[avail]).astype(np.float64) ** 2
        chosen = rng.choice(avail, size=int(counts[c]), replace=False, p=w / w.sum())
        for i in np.sort(chosen):
            sets[i].append(int(c))
            fill[i] += 1
    # Give each empty image a class moved from an image with several: counts stay exact.
    for e in np.flatnonzero(fill == 0):
        donors = np.flatnonzero(fill >= 2)
        d = int(donors[rng.integers(len(donors))])
        c = sets[d].pop(int(rng.integers(len(sets[d]))))
        sets[e].append(c)
        fill[d] -= 1
        fill[e] += 1
    return sets


def _instances(sets: List[List[int]], buckets: Sequence[str], max_objects: int, rng):
    """Per image, the class of each object in drawing order (later objects occlude earlier ones)."""
    images = []
    for classes in sets:
        objs = list(classes)
        for c in classes:
            while len(objs) < max_objects and rng.random() < _P_EXTRA_INSTANCE[buckets[c]]:
                objs.append(c)
        images.append([int(objs[i]) for i in rng.permutation(len(objs))])
    return images


@dataclass
class _Plan:
    train: List[List[int]]
    val: List[List[int]]
    image_count: np.ndarray
    instance_count: np.ndarray


def _check_sizes(num_classes, num_train_images, num_val_images, max_objects):
    if num_train_images < 1 or num_val_images < 0:
        raise ValueError("num_train_images must be >= 1 and num_val_images >= 0")
    if max_objects < 1:
        raise ValueError(f"max_objects_per_image must be >= 1, got {max_objects}")
    class_styles(num_classes)  # range check


def _plan_train(seed, num_classes, num_train_images, max_objects):
    train_rng, _ = _rng_streams(seed)
    target = _train_profile(num_classes, num_train_images, train_rng)
    buckets = [frequency_bucket(int(n)) for n in target]
    train = _instances(
        _assign(target, num_train_images, max_objects, train_rng), buckets, max_objects, train_rng
    )
    image_count = np.zeros(num_classes, dtype=np.int64)
    instance_count = np.zeros(num_classes, dtype=np.int64)
    for objs in train:
        np.add.at(instance_count, objs, 1)
        image_count[sorted(set(objs))] += 1
    return train, buckets, image_count, instance_count


def _plan(
    seed, num_classes, num_train_images, num_val_images, max_objects, min_val_images
) -> _Plan:
    train, buckets, image_count, instance_count = _plan_train(
        seed, num_classes, num_train_images, max_objects
    )
    val: List[List[int]] = []
    if num_val_images > 0:
        _, val_rng = _rng_streams(seed)
        # Val follows the train distribution, but every class appears in a few images so that
        # APr/APc/APf are all defined.
        scaled = np.round(image_count * (num_val_images / num_train_images)).astype(np.int64)
        target = np.clip(np.maximum(scaled, min_val_images), 1, num_val_images)
        deficit = num_val_images - int(target.sum())
        order = np.argsort(-target, kind="stable")
        i = 0
        while deficit > 0:
            c = order[i % num_classes]
            add = min(num_val_images - int(target[c]), deficit)
            target[c] += add
            deficit -= add
            i += 1
        val = _instances(
            _assign(target, num_val_images, max_objects, val_rng), buckets, max_objects, val_rng
        )
    return _Plan(train, val, image_count, instance_count)


def _categories(styles: List[SyntheticClass], image_count, instance_count) -> List[dict]:
    cats = []
    for k, st in enumerate(styles):
        cats.append(
            {
                "id": k + 1,
                "name": st.name,
                "synonyms": [st.name, st.name.replace("_", " ")],
                "def": f"a {st.texture} {st.colour} {st.shape.replace('_', ' ')} (synthetic)",
                "synset": f"synthetic_{st.name}.n.01",
                "frequency": frequency_bucket(int(image_count[k])),
                "image_count": int(image_count[k]),
                "instance_count": int(instance_count[k]),
            }
        )
    return cats


def synthetic_categories(
    *,
    seed: int = 0,
    num_classes: int = DEFAULT_NUM_CLASSES,
    num_train_images: int = DEFAULT_NUM_TRAIN_IMAGES,
    max_objects_per_image: int = DEFAULT_MAX_OBJECTS,
) -> List[dict]:
    """The ``categories`` list that :func:`generate_synthetic_lvis` writes, without rendering.

    The category statistics are the TRAIN split's and depend only on these arguments (not on the
    val size or the image size), so this is cheap (milliseconds) and exact.
    """
    _check_sizes(num_classes, num_train_images, 0, max_objects_per_image)
    _, _, image_count, instance_count = _plan_train(
        seed, num_classes, num_train_images, max_objects_per_image
    )
    return _categories(class_styles(num_classes), image_count, instance_count)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _regular_polygon(cx, cy, radius, n, angle, inner=None):
    """Vertices of a regular n-gon (or an n-pointed star when ``inner`` radius is given)."""
    if inner is None:
        t = angle + np.arange(n) * (2 * np.pi / n)
        r = np.full(n, radius)
    else:
        t = angle + np.arange(2 * n) * (np.pi / n)
        r = np.where(np.arange(2 * n) % 2 == 0, radius, inner)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _rotated(points, cx, cy, angle):
    c, s = np.cos(angle), np.sin(angle)
    x, y = points[:, 0], points[:, 1]
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _fill(mask, pts):
    # cv2 wants int32 vertices; a shift of 4 fractional bits keeps sub-pixel precision.
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)


def _shape_mask(shape, h, w, cx, cy, size, angle, rng) -> np.ndarray:
    """Binary mask of one shape of overall extent ~``size`` centred at (cx, cy)."""
    m = np.zeros((h, w), dtype=np.uint8)
    r = size / 2.0
    if shape == "circle":
        cv2.circle(
            m, (int(round(cx * 16)), int(round(cy * 16))), int(round(r * 16)), 1, -1, shift=4
        )
    elif shape == "square":
        _fill(m, _regular_polygon(cx, cy, r, 4, angle + np.pi / 4))
    elif shape == "triangle":
        _fill(m, _regular_polygon(cx, cy, r, 3, angle - np.pi / 2))
    elif shape == "c_ring":
        # Open ring: the 70-degree gap keeps it simply connected; its direction is random.
        thick = max(2, int(round(0.36 * r)))
        mid = r - thick / 2.0
        start = float(rng.uniform(0, 360))
        cv2.ellipse(
            m, (int(round(cx)), int(round(cy))), (int(round(mid)), int(round(mid))),
            start, 35, 325, 1, thick,
        )  # fmt: skip
    elif shape == "plus":
        a = 0.32 * r
        arm = np.array([[-r, -a], [r, -a], [r, a], [-r, a]])
        _fill(m, _rotated(arm, cx, cy, angle))
        _fill(m, _rotated(arm[:, ::-1], cx, cy, angle))
    elif shape == "star":
        _fill(m, _regular_polygon(cx, cy, r, 5, angle - np.pi / 2, inner=0.45 * r))
    elif shape == "ellipse":
        # Any orientation: the elongation, not the angle, is what separates it from the circle.
        ang = float(rng.uniform(0, 180))
        axes = (int(round(r * 16)), int(round(0.5 * r * 16)))
        centre = (int(round(cx * 16)), int(round(cy * 16)))
        cv2.ellipse(m, centre, axes, ang, 0, 360, 1, -1, shift=4)
    elif shape == "diamond":
        pts = np.array([[0.0, -r], [0.55 * r, 0.0], [0.0, r], [-0.55 * r, 0.0]])
        _fill(m, _rotated(pts, cx, cy, angle))
    elif shape == "half_disc":
        t = np.linspace(0, np.pi, 24)
        pts = np.stack([r * np.cos(t), 0.5 * r - r * np.sin(t)], axis=1)
        _fill(m, _rotated(pts, cx, cy, angle))
    elif shape == "crescent":
        disc = np.zeros_like(m)
        cv2.circle(disc, (int(round(cx)), int(round(cy))), int(round(r)), 1, -1)
        cut = np.zeros_like(m)
        d = 0.45 * r
        ox, oy = cx + d * np.cos(angle - np.pi / 2), cy + d * np.sin(angle - np.pi / 2)
        cv2.circle(cut, (int(round(ox)), int(round(oy))), int(round(0.8 * r)), 1, -1)
        m = disc & (1 - cut)
    else:  # pragma: no cover - SHAPES and this function are kept in sync
        raise ValueError(f"unknown shape {shape!r}")
    return m


@functools.lru_cache(maxsize=8)
def _grid(h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _background(h, w, rng) -> np.ndarray:
    """Near-grey gradient in a random direction, well apart from the saturated object colours."""
    a = rng.uniform(35, 120) + rng.uniform(-10, 10, size=3)
    b = rng.uniform(35, 120) + rng.uniform(-10, 10, size=3)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = _grid(h, w)
    t = (xx * np.cos(theta) + yy * np.sin(theta)) / max(h, w)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]


def _texture_mask(texture, h, w, scale, rng) -> Optional[np.ndarray]:
    """Where an object is painted in its darker shade (None for solid)."""
    if texture == "solid":
        return None
    yy, xx = _grid(h, w)
    period = max(4.0, 6.0 * scale)
    if texture == "striped":
        theta = rng.uniform(0, np.pi)
        phase = rng.uniform(0, period)
        u = xx * np.cos(theta) + yy * np.sin(theta) + phase
        return (np.floor(u / (period / 2)) % 2).astype(bool)
    ox, oy = rng.uniform(0, period, size=2)
    dx = (xx + ox) % period - period / 2
    dy = (yy + oy) % period - period / 2
    return dx * dx + dy * dy <= (0.3 * period) ** 2


def _visible_polygons(visible: np.ndarray):
    """Polygons (list of flat lists) whose pycocotools rasterisation is exactly ``visible``.

    The polygons run along pixel edges (pixel (x, y) is the square [x, x+1] x [y, y+1]), so their
    shoelace area equals the pixel count; contours through boundary pixel centres, what
    cv2.findContours gives, would shrink every object by half a pixel. Trick: trace the mask
    upsampled 2x; upsampled pixel u = 2x is the left/top half of pixel x (edge at x) and u = 2x + 1
    its right/bottom half (edge at x + 1), i.e. edge = ceil(u / 2). Returns None when the visible
    region has a hole: COCO/LVIS polygons cannot represent holes.
    """
    up = cv2.resize(visible, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is not None and (hierarchy[0][:, 3] >= 0).any():
        return None
    polys = []
    for c in contours:
        pts = np.ceil(c.reshape(-1, 2) / 2.0)
        if len(pts) >= 3:
            polys.append([float(v) for v in pts.ravel()])
    return polys


def _render(classes, styles, size, rng, min_size, max_size, min_visible_px):
    """Draw one image. Returns (HxWx3 uint8, [(class, polygons, area, bbox), ...])."""
    h = w = size
    scale = size / float(DEFAULT_IMAGE_SIZE)
    n = len(classes)
    for attempt in range(_LAYOUT_ATTEMPTS):
        # Crowded images may need smaller objects to keep each one mostly visible.
        shrink = 1.0 if attempt < 15 else max(0.5, 1.0 - 0.02 * (attempt - 14))
        label = np.full((h, w), -1, dtype=np.int16)
        full_area = []
        for i, c in enumerate(classes):
            s = rng.uniform(min_size, max_size) * shrink
            cx = rng.uniform(s / 2, w - s / 2)
            cy = rng.uniform(s / 2, h - s / 2)
            angle = rng.uniform(-np.pi / 12, np.pi / 12)
            m = _shape_mask(styles[c].shape, h, w, cx, cy, s, angle, rng)
            label[m > 0] = i
            full_area.append(int(m.sum()))
        anns = []
        for i, c in enumerate(classes):
            vis = (label == i).astype(np.uint8)
            area = int(vis.sum())
            # Mostly visible only: a sliver left by occlusion is not a learnable instance.
            if area < max(min_visible_px, 0.5 * full_area[i]):
                break
            polys = _visible_polygons(vis)
            if not polys:
                break
            ys, xs = np.nonzero(vis)
            x0, y0 = int(xs.min()), int(ys.min())
            bbox = [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]
            anns.append((c, polys, area, bbox))
        if len(anns) == n:
            break
    else:
        raise RuntimeError(f"could not lay out {n} objects in a {size}px image; lower max_objects")

    img = _background(h, w, rng)
    for i, c in enumerate(classes):
        st = styles[c]
        where = label == i
        base = np.clip(np.array(st.rgb, np.float64) + rng.uniform(-15, 15, size=3), 0, 255)
        img[where] = base
        tex = _texture_mask(st.texture, h, w, scale, rng)
        if tex is not None:
            img[where & tex] = base * 0.45
    img += rng.normal(0.0, 5.0, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), anns


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _write_json_atomic(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        # dumps, not dump: only the one-shot encoder is the fast C one.
        f.write(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)


def _split(
    split, plan_images, first_image_id, first_ann_id, styles, seed, size, image_dir, jpeg_quality
):
    folder = SPLIT_FOLDERS[split]
    min_size, max_size = 14.0 * size / 128.0, 50.0 * size / 128.0
    min_visible_px = max(12, int(round(40 * (size / 128.0) ** 2)))
    all_ids = set(range(1, len(styles) + 1))
    images, annotations = [], []
    ann_id = first_ann_id
    for k, classes in enumerate(plan_images):
        image_id = first_image_id + k
        rng = _image_rng(seed, split, image_id)
        pixels, anns = _render(classes, styles, size, rng, min_size, max_size, min_visible_px)
        fname = f"{image_id:012d}.jpg"
        # 4:4:4 chroma keeps the colour of 14 px objects intact.
        Image.fromarray(pixels).save(
            os.path.join(image_dir, fname), quality=jpeg_quality, subsampling=0
        )
        present = sorted({c + 1 for c in classes})
        images.append(
            {
                "id": image_id,
                "width": size,
                "height": size,
                "file_name": f"{folder}/{fname}",
                "coco_url": f"{URL_PREFIX}/{folder}/{fname}",
                "flickr_url": "",
                "date_captured": "2021-06-19 00:00:00",
                "license": 1,
                # Every object is annotated, so every absent class is verified absent: LVISEval
                # then counts detections of absent classes as false positives.
                "neg_category_ids": sorted(all_ids.difference(present)),
                "not_exhaustive_category_ids": [],
            }
        )
        for c, polys, area, bbox in anns:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": c + 1,
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
    seed: int = 0,
    num_classes: int = DEFAULT_NUM_CLASSES,
    num_train_images: int = DEFAULT_NUM_TRAIN_IMAGES,
    num_val_images: int = DEFAULT_NUM_VAL_IMAGES,
    image_size: int = DEFAULT_IMAGE_SIZE,
    max_objects_per_image: int = DEFAULT_MAX_OBJECTS,
    min_val_images: int = 3,
    jpeg_quality: int = 92,
) -> Dict[str, str]:
    """Write the synthetic LVIS-format dataset under ``out_dir`` (see the module docstring).

    Args:
        out_dir: output folder (created).
        seed: everything (classes' frequencies, layouts, pixels) is a function of it.
        num_classes: K, categories get ids 1..K.
        num_train_images / num_val_images: split sizes. A class can only be "frequent" (> 100
            train images) when num_train_images > 100.
        image_size: square images of this side; object sizes scale with it (14-50 px at 128).
        max_objects_per_image: at most this many objects per image (at least one).
        min_val_images: each class appears in at least this many val images.
        jpeg_quality: JPEG quality of the images.

    Returns:
        dict with ``out_dir``, ``train_json``, ``val_json``, ``image_root`` (ends with a separator,
        as detectron2's LVIS loader concatenates it with the split folder), ``train_image_dir`` and
        ``val_image_dir``.
    """
    _check_sizes(num_classes, num_train_images, num_val_images, max_objects_per_image)
    plan = _plan(
        seed, num_classes, num_train_images, num_val_images, max_objects_per_image, min_val_images
    )
    styles = class_styles(num_classes)
    categories = _categories(styles, plan.image_count, plan.instance_count)

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

    params = generation_params(
        seed=seed,
        num_classes=num_classes,
        num_train_images=num_train_images,
        num_val_images=num_val_images,
        image_size=image_size,
        max_objects_per_image=max_objects_per_image,
        min_val_images=min_val_images,
        jpeg_quality=jpeg_quality,
    )
    licenses = [{"id": 1, "name": "CC0 1.0 (synthetic images)", "url": ""}]
    train_imgs, train_anns = _split(
        "train", plan.train, 1, 1, styles, seed, image_size, paths["train_image_dir"], jpeg_quality
    )
    val_imgs, val_anns = _split(
        "val",
        plan.val,
        num_train_images + 1,
        len(train_anns) + 1,
        styles,
        seed,
        image_size,
        paths["val_image_dir"],
        jpeg_quality,
    )
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
        "Synthetic LVIS dataset in %s: %d/%d train/val images, %d/%d annotations",
        out_dir,
        len(train_imgs),
        len(val_imgs),
        len(train_anns),
        len(val_anns),
    )
    return paths


def generation_params(**overrides) -> dict:
    """Every parameter of :func:`generate_synthetic_lvis` (defaults updated with ``overrides``)
    plus ``generator_version``: what ``info["synthetic_params"]`` of the jsons records, so that a
    dataset generated by other parameters or an older generator can be recognised."""
    sig = inspect.signature(generate_synthetic_lvis)
    params = {k: p.default for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise TypeError(f"unknown generator parameter(s) {unknown}; known: {sorted(params)}")
    params.update(overrides)
    params["generator_version"] = GENERATOR_VERSION
    return params


def _summary(paths: Dict[str, str]) -> str:
    lines = []
    for split in ("train", "val"):
        with open(paths[f"{split}_json"]) as f:
            data = json.load(f)
        per_cls: Dict[int, set] = {}
        for a in data["annotations"]:
            per_cls.setdefault(a["category_id"], set()).add(a["image_id"])
        lines.append(
            f"{split}: {len(data['images'])} images, {len(data['annotations'])} annotations, "
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


def main(argv=None) -> int:
    """CLI entry point: generate and print a summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-classes", type=int, default=DEFAULT_NUM_CLASSES)
    p.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN_IMAGES)
    p.add_argument("--num-val", type=int, default=DEFAULT_NUM_VAL_IMAGES)
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    p.add_argument("--max-objects", type=int, default=DEFAULT_MAX_OBJECTS)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    paths = generate_synthetic_lvis(
        args.out,
        seed=args.seed,
        num_classes=args.num_classes,
        num_train_images=args.num_train,
        num_val_images=args.num_val,
        image_size=args.image_size,
        max_objects_per_image=args.max_objects,
    )
    print(f"wrote {paths['train_json']} and {paths['val_json']} ({time.perf_counter() - t0:.1f} s)")
    print(f"image_root: {paths['image_root']}")
    print(_summary(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
