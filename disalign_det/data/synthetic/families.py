"""LVIS's long-tail structure for the generated dataset (the ``"lvis"`` preset).

LVIS v1.0 has 337 rare, 461 common and 405 frequent classes, and most rare classes are fine-grained
relatives of a frequent one (a breed beside "dog"). This module builds a class set with that shape:

* ``n_f`` frequent **parents**, each a unique (shape, colour), solid;
* ``n_c + n_r`` **variants**, each a copy of a parent (same shape, colour, so the same mask and
  most of the appearance) plus one learnable detail painted inside it: a dot, a bar, two bars, a
  cross or a ring (:data:`.render.DETAILS`). Siblings differ in the detail;
* which variant is common and which is rare, and the number of train images of each class, are
  drawn from the seed; the counts follow LVIS's buckets (rare 1-10 train images, common 11-100,
  frequent > 100).

The bucket sizes are LVIS v1.0's proportions scaled to ``num_classes`` (60 by default: 20/23/17).
Class ids are alphabetical, as in LVIS, which keeps a family's ids adjacent.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .render import BODIED_SHAPES, COLOURS, DETAILS, SHAPES, SyntheticClass

__all__ = ["LVIS_V1_BUCKETS", "bucket_sizes", "family_styles", "family_profile", "families"]

# Rare / common / frequent class counts of LVIS v1.0.
LVIS_V1_BUCKETS = {"r": 337, "c": 461, "f": 405}
# Train-image counts of each bucket at the generated scale: frequent from FREQUENT_TOP * N down to
# just above 100, common 90 -> 12, rare 10 -> 2 (a class in a single image teaches nothing
# measurable at this scale).
FREQUENT_TOP = 0.22
FREQUENT_MIN = 110
COMMON_RANGE = (90.0, 12.0)
RARE_RANGE = (10.0, 2.0)


def bucket_sizes(num_classes: int) -> Tuple[int, int, int]:
    """(n_r, n_c, n_f): LVIS v1.0's bucket proportions scaled to ``num_classes`` (largest
    remainder, so they sum exactly), each at least 1."""
    if num_classes < 3:
        raise ValueError(f"num_classes must be >= 3 (one per r/c/f bucket), got {num_classes}")
    total = sum(LVIS_V1_BUCKETS.values())
    keys = ("r", "c", "f")
    exact = np.array([LVIS_V1_BUCKETS[k] * num_classes / total for k in keys])
    sizes = np.maximum(np.floor(exact).astype(int), 1)
    # Hand out the rest by largest remainder (ties: the order above), take back from the largest.
    for k in np.argsort(-(exact - np.floor(exact)), kind="stable"):
        if sizes.sum() >= num_classes:
            break
        sizes[k] += 1
    while sizes.sum() > num_classes:
        sizes[int(np.argmax(sizes))] -= 1
    return int(sizes[0]), int(sizes[1]), int(sizes[2])


def _parent_styles(n_f: int, num_classes: int) -> List[SyntheticClass]:
    # Unique (shape, colour): shapes cycle, the colour advances by one per class and one more per
    # round of shapes, so two parents with the same shape differ in colour.
    if n_f > len(SHAPES) * len(COLOURS):
        raise ValueError(
            f"num_classes={num_classes} needs {n_f} frequent parents but there are only "
            f"{len(SHAPES) * len(COLOURS)} (shape, colour) pairs: use fewer classes"
        )
    out = []
    for j in range(n_f):
        rnd, shape = divmod(j, len(SHAPES))
        cname, rgb = COLOURS[(j + rnd) % len(COLOURS)]
        name = f"{cname}_{SHAPES[shape]}"
        out.append(SyntheticClass(name, SHAPES[shape], cname, rgb, "solid"))
    return out


def family_styles(num_classes: int) -> List[SyntheticClass]:
    """The classes of the ``"lvis"`` preset in id order (alphabetical by name).

    Variants are dealt to the parents with a bodied shape (a detail at the centre of a ring or a
    crescent would not be visible) round-robin, each round with the next detail, so siblings always
    differ in their detail. Depends on ``num_classes`` only.
    """
    n_r, n_c, n_f = bucket_sizes(num_classes)
    parents = _parent_styles(n_f, num_classes)
    hosts = [p for p in parents if p.shape in BODIED_SHAPES]
    n_var = n_r + n_c
    capacity = len(hosts) * (len(DETAILS) - 1)
    if n_var > capacity:
        raise ValueError(
            f"num_classes={num_classes} needs {n_var} variants but {len(hosts)} parents with "
            f"{len(DETAILS) - 1} details each hold at most {capacity}: use fewer classes"
        )
    variants = []
    for t in range(n_var):
        rnd, k = divmod(t, len(hosts))
        p, detail = hosts[k], DETAILS[1 + rnd]
        variants.append(
            SyntheticClass(
                f"{p.name}_{detail}", p.shape, p.colour, p.rgb, p.texture, detail, parent=p.name
            )
        )
    return sorted(parents + variants, key=lambda s: s.name)


def families(styles: Sequence[SyntheticClass]) -> Dict[int, List[int]]:
    """Parent index -> indices of its variants (a parent without variants maps to [])."""
    index = {s.name: i for i, s in enumerate(styles)}
    out: Dict[int, List[int]] = {i: [] for i, s in enumerate(styles) if s.parent is None}
    for i, s in enumerate(styles):
        if s.parent is not None:
            out[index[s.parent]].append(i)
    return out


def _geom_counts(hi: float, lo: float, n: int) -> List[int]:
    if n <= 0:
        return []
    return [int(round(v)) for v in np.geomspace(hi, lo, n)]


def family_profile(
    styles: Sequence[SyntheticClass],
    num_images: int,
    rng,
    variant_images: Optional[Tuple[float, float]] = None,
) -> np.ndarray:
    """Target number of train images per class: parents frequent, variants common or rare.

    ``variant_images=(most, fewest)``: instead of LVIS's common and rare buckets, the variants'
    counts run geometrically from ``most`` down to ``fewest`` in one run (a flatter tail, as
    ADE20K's pixel classes have; :mod:`disalign_det.data.sem_seg_synth`). The same draws from
    ``rng`` either way."""
    n_r, n_c, n_f = bucket_sizes(len(styles))
    if FREQUENT_TOP * num_images < FREQUENT_MIN:
        raise ValueError(
            f"num_train_images={num_images} is too small for the 'lvis' preset: frequent classes "
            f"need > 100 train images (use at least {int(np.ceil(FREQUENT_MIN / FREQUENT_TOP))})"
        )
    parents = [i for i, s in enumerate(styles) if s.parent is None]
    variants = [i for i, s in enumerate(styles) if s.parent is not None]
    counts = np.zeros(len(styles), dtype=np.int64)
    counts[rng.permutation(parents)] = _geom_counts(FREQUENT_TOP * num_images, FREQUENT_MIN, n_f)
    order = rng.permutation(variants)
    if variant_images is None:
        counts[order[:n_c]] = _geom_counts(*COMMON_RANGE, n_c)
        counts[order[n_c:]] = _geom_counts(*RARE_RANGE, n_r)
    else:
        counts[order] = _geom_counts(*variant_images, n_c + n_r)
    return counts


def related(styles: Sequence[SyntheticClass]) -> List[List[int]]:
    """For each class, the other members of its family (parent and siblings, or variants)."""
    fam = families(styles)
    out: List[List[int]] = [[] for _ in styles]
    for p, kids in fam.items():
        members = [p] + kids
        for m in members:
            out[m] = [o for o in members if o != m]
    return out
