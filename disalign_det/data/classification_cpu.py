"""Two long-tailed classification sets small enough for CPU experiments, built in memory on first
load (deterministic; nothing is downloaded):

* ``digits_lt_{train,test}``: scikit-learn's 1,797 real 8x8 handwritten digits
  (``sklearn.datasets.load_digits``, shipped inside the package), upsampled to 32x32 RGB. The test
  split holds ``DIGITS_TEST_PER_CLASS`` images of every class (balanced); the training split keeps
  an exponential profile ``n_i = 150 * (1/50) ** (i / 9)`` over the class ranks (150 -> 3 images,
  imbalance ratio 50), the rank order a fixed permutation of the digits.
* ``synth_cls_lt_{train,test}``: one rendered object per 32x32 image, classes from the LVIS-like
  generator's families (``disalign_det.data.synthetic``): frequent parents (shape + colour) and
  their fine-grained variants (the same object plus a small detail), so a rare class looks like a
  frequent one, the look-alike bias of LVIS. Parents take the head of an exponential profile
  (100 -> 2 images over 30 classes, ratio 50), variants the tail; 20 test images per class.

Many / few thresholds scale ImageNet-LT's (> 100, < 20 of up to 1,280) to these profiles so each
split holds several classes: many > 50, few < 10 images (the same 5:1 ratio).
"""

import functools
import logging

import numpy as np

from .classification import register_classification_dataset

__all__ = [
    "CPU_CLASSIFICATION_DATASETS",
    "digits_lt",
    "exponential_profile",
    "register_cpu_classification",
    "synth_cls_lt",
]

logger = logging.getLogger(__name__)

CPU_MANY_THRESHOLD, CPU_FEW_THRESHOLD = 50, 10
DIGITS_TEST_PER_CLASS = 20
SYNTH_NUM_CLASSES = 30
SYNTH_TEST_PER_CLASS = 20
IMAGE_SIZE = 32
CPU_CLASSIFICATION_DATASETS = (
    "digits_lt_train",
    "digits_lt_test",
    "synth_cls_lt_train",
    "synth_cls_lt_test",
)


def exponential_profile(num_classes: int, head: int, ratio: float) -> np.ndarray:
    """(C,) int64 ``round(head * ratio ** (-i / (C - 1)))`` for ranks i = 0..C-1 (head -> head /
    ratio)."""
    i = np.arange(num_classes, dtype=np.float64)
    return np.round(head * ratio ** (-i / max(num_classes - 1, 1))).astype(np.int64)


def _to_rgb32(gray: np.ndarray) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(gray.astype(np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.repeat(np.asarray(img)[:, :, None], 3, axis=2)


@functools.lru_cache(maxsize=None)
def digits_lt():
    """``{"train": [...], "test": [...]}`` dataset dicts of the long-tailed digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0))  # 0..16 intensities -> 0..255
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    rank_to_class = rng.permutation(10)
    profile = exponential_profile(10, 150, 50.0)
    out = {"train": [], "test": []}
    for rank, c in enumerate(rank_to_class):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test, train = idx[:DIGITS_TEST_PER_CLASS], idx[DIGITS_TEST_PER_CLASS:]
        train = train[: profile[rank]]
        for split, chosen in (("train", train), ("test", test)):
            for j in chosen:
                out[split].append(
                    {"image": _to_rgb32(images[j]), "image_id": int(j), "label": int(c)}
                )
    for split in out:
        out[split].sort(key=lambda d: d["image_id"])
    return out


@functools.lru_cache(maxsize=None)
def synth_cls_lt():
    """``{"train": [...], "test": [...], "classes": [names]}`` of the rendered family set."""
    from .synthetic.families import family_styles
    from .synthetic.render import RenderSpec, render

    styles = family_styles(SYNTH_NUM_CLASSES)
    rng = np.random.default_rng(0)
    parents = [i for i, s in enumerate(styles) if s.parent is None]
    variants = [i for i, s in enumerate(styles) if s.parent is not None]
    order = list(rng.permutation(parents)) + list(rng.permutation(variants))
    profile = exponential_profile(SYNTH_NUM_CLASSES, 100, 50.0)
    spec = RenderSpec(min_size=18, max_size=26, min_visible_px=30, min_detail_visible=0.5)
    out = {"train": [], "test": [], "classes": [s.name for s in styles]}
    image_id = 0
    for rank, c in enumerate(order):
        for split, n in (("train", profile[rank]), ("test", SYNTH_TEST_PER_CLASS)):
            for _ in range(int(n)):
                img, _ = render([c], styles, IMAGE_SIZE, IMAGE_SIZE, spec, rng)
                out[split].append({"image": img, "image_id": image_id, "label": int(c)})
                image_id += 1
    return out


def _split(build, split):
    return list(build()[split])


def register_cpu_classification() -> None:
    """Register the four names (nothing is built before the first load)."""
    for prefix, build, num_classes in (
        ("digits_lt", digits_lt, 10),
        ("synth_cls_lt", synth_cls_lt, SYNTH_NUM_CLASSES),
    ):
        train = functools.partial(_split, build, "train")
        for split in ("train", "test"):
            register_classification_dataset(
                f"{prefix}_{split}",
                functools.partial(_split, build, split),
                num_classes=num_classes,
                train_loader=train,
                many_threshold=CPU_MANY_THRESHOLD,
                few_threshold=CPU_FEW_THRESHOLD,
            )
