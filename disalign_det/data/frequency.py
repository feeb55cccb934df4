"""LVIS's rare / common / frequent rule and per-class counting: pure maths, no dataset catalog.

A leaf module (standard library only): the generator (:mod:`.synthetic`), the json reader
(:mod:`.lvis_json`) and the class counts (:mod:`.class_counts`) all import it, it imports none of
them.
"""

from typing import Iterable, List, Mapping, Tuple

__all__ = [
    "RARE_MAX_IMAGES",
    "COMMON_MAX_IMAGES",
    "FREQUENCY_SOURCES",
    "check_frequency_source",
    "counts_from_annotations",
    "frequency_bucket",
]

# LVIS (Gupta et al., 2019): a class is rare if it is in 1-10 TRAINING images, common if in 11-100,
# frequent if in more than 100.
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100
# What n_j counts (MODEL.DISALIGN.FREQUENCY_SOURCE).
FREQUENCY_SOURCES = ("instance_count", "image_count")


def frequency_bucket(image_count: int) -> str:
    """LVIS frequency bucket ('r', 'c' or 'f') of a class present in ``image_count`` train images.

    A class in no image counts as rare (it is at the tail's end; LVIS has no such class).
    """
    if image_count <= RARE_MAX_IMAGES:
        return "r"
    if image_count <= COMMON_MAX_IMAGES:
        return "c"
    return "f"


def check_frequency_source(source: str) -> None:
    """Raise ValueError naming the config key unless ``source`` is one of FREQUENCY_SOURCES."""
    if source not in FREQUENCY_SOURCES:
        raise ValueError(
            f"Unknown class-frequency source {source!r} (MODEL.DISALIGN.FREQUENCY_SOURCE): "
            f"expected one of {list(FREQUENCY_SOURCES)}"
        )


def counts_from_annotations(
    num_classes: int, annotations: Iterable[Mapping]
) -> Tuple[List[int], List[int]]:
    """(image_count, instance_count), each (K,), of LVIS-format annotations (category ids 1..K)."""
    instance_count = [0] * num_classes
    images_of = [set() for _ in range(num_classes)]
    for a in annotations:
        c = a["category_id"] - 1
        instance_count[c] += 1
        images_of[c].add(a["image_id"])
    return [len(s) for s in images_of], instance_count
