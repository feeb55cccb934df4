"""The plan of the generated dataset: which objects each image holds, its size, its negatives.

No pixels are drawn here: :mod:`.generate` turns plans into images and jsons.
Presets (``"basic"``, ``"lvis"``) fix the rules; see that module's docstring and docs/synthetic.md.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..frequency import frequency_bucket
from . import families
from .render import COLOURS, SHAPES, TEXTURES, SyntheticClass


@dataclass(frozen=True)
class _Preset:
    """Defaults of the user-facing parameters, and the fixed rules of a preset."""

    num_classes: int
    num_train_images: int
    num_val_images: int
    image_size: int
    max_objects_per_image: int
    min_val_images: int
    max_classes_per_image: int
    # Probability of one more instance of a class already in an image (drawn repeatedly), by
    # bucket: frequent classes are also the ones with many instances per image, as in LVIS.
    p_extra: Dict[str, float]
    families: bool = False
    # Object extent (px) at image_size 128, scaled with image_size.
    object_size: tuple = (14.0, 50.0)
    min_visible_frac: float = 0.5
    min_detail_visible: float = 0.0
    # Landscape and portrait images: short side in [short_range] * image_size, aspect in [aspect].
    varied_sizes: bool = False
    short_range: tuple = (0.75, 1.0)
    aspect: tuple = (1.0, 1.6)
    # Per (image, present class): probability that some of its instances are left unannotated.
    p_not_exhaustive: float = 0.0
    # Probability that an absent class unrelated to the classes present is a verified negative.
    p_neg_unrelated: float = 1.0


PRESETS = {
    "basic": _Preset(20, 700, 160, 128, 6, 3, 4, {"f": 0.45, "c": 0.3, "r": 0.2}),
    "lvis": _Preset(
        60,
        1000,
        200,
        128,
        8,
        4,
        6,
        {"f": 0.3, "c": 0.2, "r": 0.15},
        families=True,
        object_size=(20.0, 48.0),
        min_visible_frac=0.6,
        min_detail_visible=0.8,
        varied_sizes=True,
        p_not_exhaustive=0.1,
        p_neg_unrelated=0.5,
    ),
}
DEFAULT_NUM_CLASSES = PRESETS["basic"].num_classes
DEFAULT_NUM_TRAIN_IMAGES = PRESETS["basic"].num_train_images
DEFAULT_NUM_VAL_IMAGES = PRESETS["basic"].num_val_images
# Share of the classes in the frequent / rare buckets of the basic profile; the rest are common.
_FREQUENT_SHARE = 0.25
_RARE_SHARE = 0.35


def _preset(name: str) -> _Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown synthetic preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def class_styles(num_classes: int) -> List[SyntheticClass]:
    """The (shape, colour, texture) of the basic preset's classes ``0..num_classes-1``, distinct.

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


def synthetic_styles(preset: str = "basic", num_classes: Optional[int] = None):
    """The classes of ``preset`` in category-id order (id = index + 1)."""
    p = _preset(preset)
    k = p.num_classes if num_classes is None else num_classes
    return families.family_styles(k) if p.families else class_styles(k)


# --------------------------------------------------------------------------------------------------
# Plan: which objects each image holds, its size, its negatives. No pixels are drawn here.
# --------------------------------------------------------------------------------------------------


@dataclass
class ImagePlan:
    """One image: ``objects`` are class indices in drawing order, ``annotated[i]`` whether object
    i gets an annotation; ``neg`` / ``not_exhaustive`` class indices (ids are index + 1)."""

    objects: List[int]
    width: int
    height: int
    annotated: List[bool] = field(default_factory=list)
    neg: List[int] = field(default_factory=list)
    not_exhaustive: List[int] = field(default_factory=list)


def _rng_streams(seed: int):
    # Independent streams, so that e.g. changing the val size never changes the train split.
    train_plan, val_plan = np.random.SeedSequence([seed, 0]).spawn(2)
    return np.random.default_rng(train_plan), np.random.default_rng(val_plan)


def _extras_rng(seed: int, split: str):
    # The "lvis" preset's extra choices (sizes, unannotated instances, negatives) on their own
    # stream: the basic preset's plan is unchanged by their existence.
    return np.random.default_rng(np.random.SeedSequence([seed, 2, 0 if split == "train" else 1]))


def _image_rng(seed: int, split: str, image_id: int):
    # One stream per image: an image's pixels do not depend on how many images precede it.
    return np.random.default_rng(
        np.random.SeedSequence([seed, 1, 0 if split == "train" else 1, image_id])
    )


def _basic_profile(num_classes: int, num_images: int, rng) -> np.ndarray:
    """Target number of train images per class: a long tail spanning LVIS's three buckets."""
    if num_classes < 3:
        raise ValueError(f"num_classes must be >= 3 (one per r/c/f bucket), got {num_classes}")
    n_f = max(1, int(round(_FREQUENT_SHARE * num_classes)))
    n_r = max(1, int(round(_RARE_SHARE * num_classes)))
    n_c = max(1, num_classes - n_f - n_r)
    n_r = num_classes - n_f - n_c
    # Frequent: from half the images down to 110 (>100); common 90 -> 12; rare 10 -> 2.
    geom = families._geom_counts
    ranked = geom(max(110.0, 0.5 * num_images), 110.0, n_f) + geom(90.0, 12.0, n_c)
    ranked = np.clip(np.array(ranked + geom(10.0, 2.0, n_r), dtype=np.int64), 1, num_images)
    # Which class gets which rank is random (as in LVIS, where ids are alphabetical).
    counts = np.empty(num_classes, dtype=np.int64)
    counts[rng.permutation(num_classes)] = _top_up(ranked, n_f, num_images)
    return counts


def _top_up(ranked: np.ndarray, n_f: int, num_images: int) -> np.ndarray:
    # Every image needs at least one object: top up the first n_f classes if the tail is too thin.
    deficit = num_images - int(ranked.sum())
    i = 0
    while deficit > 0:
        add = min(num_images - ranked[i % n_f], deficit)
        ranked[i % n_f] += add
        deficit -= add
        i += 1
    return ranked


def _train_profile(preset: _Preset, styles, num_images: int, rng, variant_images=None):
    if not preset.families:
        if variant_images is not None:
            raise ValueError("variant_images needs a preset with families ('lvis')")
        return _basic_profile(len(styles), num_images, rng)
    counts = families.family_profile(styles, num_images, rng, variant_images)
    parents = np.flatnonzero([s.parent is None for s in styles])
    counts[parents] = _top_up(counts[parents].copy(), len(parents), num_images)
    return counts


def _assign(counts: np.ndarray, num_images: int, cap: int, rng) -> List[List[int]]:
    """Distinct classes of each image such that class ``c`` is in exactly ``counts[c]`` images."""
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


def _instances(sets, buckets: Sequence[str], max_objects: int, p_extra, rng) -> List[List[int]]:
    """Per image, the class of each object in drawing order (later objects occlude earlier ones)."""
    images = []
    for classes in sets:
        objs = list(classes)
        for c in classes:
            while len(objs) < max_objects and rng.random() < p_extra[buckets[c]]:
                objs.append(c)
        images.append([int(objs[i]) for i in rng.permutation(len(objs))])
    return images


def _image_plans(objects, preset: _Preset, params, styles, split, rng) -> List[ImagePlan]:
    """Sizes, unannotated instances and negatives of each image (see the module docstring)."""
    k, size = len(styles), params["image_size"]
    plans = []
    if not preset.families:  # basic: square, exhaustive, every absent class a verified negative
        for objs in objects:
            neg = sorted(set(range(k)).difference(objs))
            plans.append(ImagePlan(objs, size, size, [True] * len(objs), neg, []))
        return plans
    related = families.related(styles)
    for objs in objects:
        short = int(round(rng.uniform(*preset.short_range) * size))
        long_ = int(round(short * rng.uniform(*preset.aspect)))
        w, h = (long_, short) if rng.random() < 0.5 else (short, long_)
        present = sorted(set(objs))
        annotated = [True] * len(objs)
        objs = list(objs)
        not_exhaustive = []
        for c in present:
            room = params["max_objects_per_image"] - len(objs)
            if room >= 1 and rng.random() < preset.p_not_exhaustive:
                # Instances drawn but not annotated: the class is present, its list incomplete.
                for _ in range(int(rng.integers(1, min(2, room) + 1))):
                    at = int(rng.integers(len(objs) + 1))
                    objs.insert(at, c)
                    annotated.insert(at, False)
                not_exhaustive.append(c)
        absent = set(range(k)).difference(present)
        # The relatives of what is there are always checked (the hard negatives); other absent
        # classes only sometimes, as LVIS verifies absence for a sample of classes per image.
        hard = {r for c in present for r in related[c]} & absent
        soft = [c for c in sorted(absent - hard) if rng.random() < preset.p_neg_unrelated]
        plans.append(ImagePlan(objs, w, h, annotated, sorted(hard.union(soft)), not_exhaustive))
    return plans


def _plan_train(params, preset, styles, variant_images=None):
    train_rng, _ = _rng_streams(params["seed"])
    target = _train_profile(preset, styles, params["num_train_images"], train_rng, variant_images)
    buckets = [frequency_bucket(int(n)) for n in target]
    cap = min(preset.max_classes_per_image, params["max_objects_per_image"])
    sets = _assign(target, params["num_train_images"], cap, train_rng)
    return _instances(sets, buckets, params["max_objects_per_image"], preset.p_extra, train_rng)


def _counts(objects: List[List[int]], k: int):
    image_count = np.zeros(k, dtype=np.int64)
    instance_count = np.zeros(k, dtype=np.int64)
    for objs in objects:
        np.add.at(instance_count, objs, 1)
        image_count[sorted(set(objs))] += 1
    return image_count, instance_count


def _plan_val(params, preset, image_count, buckets) -> List[List[int]]:
    n_val, n_train = params["num_val_images"], params["num_train_images"]
    if n_val == 0:
        return []
    _, val_rng = _rng_streams(params["seed"])
    # Val follows the train distribution, but every class appears in a few images so that
    # APr/APc/APf are all defined.
    scaled = np.round(image_count * (n_val / n_train)).astype(np.int64)
    target = np.clip(np.maximum(scaled, params["min_val_images"]), 1, n_val)
    deficit = n_val - int(target.sum())
    order = np.argsort(-target, kind="stable")
    i = 0
    while deficit > 0:
        c = order[i % len(target)]
        add = min(n_val - int(target[c]), deficit)
        target[c] += add
        deficit -= add
        i += 1
    cap = min(preset.max_classes_per_image, params["max_objects_per_image"])
    sets = _assign(target, n_val, cap, val_rng)
    return _instances(sets, buckets, params["max_objects_per_image"], preset.p_extra, val_rng)
