"""Pixels of the generated LVIS-format dataset: shapes, details, layout, exact visible polygons.

Pure functions of their arguments and of the ``numpy.random.Generator`` they are given; the
generator (:mod:`.generate`) decides what to draw, this module draws it.
"""

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np

__all__ = ["SHAPES", "BODIED_SHAPES", "COLOURS", "TEXTURES", "DETAILS", "SyntheticClass"]

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
# Shapes whose centre is inside the object, so a detail drawn at the centre is visible: the parents
# of fine-grained families (the ring is hollow there, the crescent cut away).
BODIED_SHAPES = tuple(s for s in SHAPES if s not in ("c_ring", "crescent"))
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
# Fine-grained details painted inside an object (its silhouette, hence its mask, is unchanged):
# what tells a variant from its parent ("none") and from its siblings.
DETAILS = ("none", "dot", "bar", "two_bars", "cross", "ring")
_DETAIL_WORDS = {
    "none": "",
    "dot": "with a dark dot at its centre",
    "bar": "with one dark bar across its centre",
    "two_bars": "with two dark parallel bars",
    "cross": "with a dark cross at its centre",
    "ring": "with a dark ring around its centre",
}
# Darker shade of the object's colour used for textures and details.
_SHADE = 0.45


@dataclass(frozen=True)
class SyntheticClass:
    """Appearance of one synthetic class. ``parent`` is the name of the frequent class it is a
    fine-grained variant of (same shape, colour and texture, plus ``detail``), or None."""

    name: str
    shape: str
    colour: str
    rgb: tuple
    texture: str
    detail: str = "none"
    parent: Optional[str] = None

    def describe(self) -> str:
        words = f"a {self.texture} {self.colour} {self.shape.replace('_', ' ')}"
        if self.detail != "none":
            words += " " + _DETAIL_WORDS[self.detail]
        if self.parent is not None:
            words += f" (a fine-grained variant of {self.parent})"
        return words + " (synthetic)"


# --------------------------------------------------------------------------------------------------
# Shapes
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


def shape_mask(shape, h, w, cx, cy, size, angle, rng) -> np.ndarray:
    """Binary ``(h, w)`` uint8 mask of one shape of overall extent ~``size`` centred at (cx, cy)."""
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
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


def detail_mask(detail, shape, h, w, cx, cy, size, angle) -> Optional[np.ndarray]:
    """Where a fine-grained ``detail`` is painted, ``(h, w)`` bool, or None for "none".

    Centred on the object and sized from it; the caller intersects it with the object's visible
    mask. Bars follow the object's rotation, so they look the same on every instance. The marks are
    kept inside the thinner shapes (diamond, ellipse, half disc) by their size, not clipped away.
    """
    if detail == "none":
        return None
    yy, xx = _grid(h, w)
    r = size / 2.0
    # Radius of the central area the shape is guaranteed to cover (the half disc's centre is
    # 0.5 r from its flat edge, the ellipse's minor semi-axis is 0.5 r, the diamond ~0.47 r).
    core = 0.45 * r if shape in ("diamond", "ellipse", "half_disc", "star") else 0.6 * r
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # object frame
    rad2 = dx * dx + dy * dy
    half = max(1.0, 0.16 * r)
    if detail == "dot":
        return rad2 <= max(1.5, 0.5 * core) ** 2
    if detail == "ring":
        return (rad2 <= core**2) & (rad2 >= max(1.0, 0.5 * core) ** 2)
    if detail == "bar":
        return np.abs(v) <= half
    if detail == "two_bars":
        off = max(half + 1.0, 0.55 * core)
        return np.abs(np.abs(v) - off) <= 0.8 * half
    if detail == "cross":
        return ((np.abs(v) <= half) & (np.abs(u) <= core)) | (
            (np.abs(u) <= half) & (np.abs(v) <= core)
        )
    raise ValueError(f"unknown detail {detail!r}; known: {DETAILS}")


@functools.lru_cache(maxsize=64)
def _grid(h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def background(h, w, rng) -> np.ndarray:
    """Near-grey gradient in a random direction, well apart from the saturated object colours."""
    a = rng.uniform(35, 120) + rng.uniform(-10, 10, size=3)
    b = rng.uniform(35, 120) + rng.uniform(-10, 10, size=3)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = _grid(h, w)
    t = (xx * np.cos(theta) + yy * np.sin(theta)) / max(h, w)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]


def texture_mask(texture, h, w, scale, rng) -> Optional[np.ndarray]:
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


def visible_polygons(visible: np.ndarray):
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


# --------------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderSpec:
    """How objects are laid out: sizes in pixels, how much of each must stay visible."""

    min_size: float
    max_size: float
    min_visible_px: int
    min_visible_frac: float = 0.5
    # Share of an object's detail (or, without one, of its central core) that must stay visible:
    # an occluded detail would make a variant look like its parent. 0 disables the check.
    min_detail_visible: float = 0.0
    texture_scale: float = 1.0
    attempts: int = 60


def render(
    classes: Sequence[int],
    styles: Sequence[SyntheticClass],
    h: int,
    w: int,
    spec: RenderSpec,
    rng,
):
    """Draw one ``(h, w)`` image of objects of ``classes`` (in drawing order: later ones occlude).

    Returns (``(h, w, 3)`` uint8 image, ``[(index, polygons, area, bbox), ...]`` for every object,
    ``index`` its position in ``classes``). Raises RuntimeError when no layout keeps every object
    visible enough.
    """
    n = len(classes)
    check_detail = spec.min_detail_visible > 0
    for attempt in range(spec.attempts):
        # Crowded images may need smaller objects to keep each one mostly visible.
        shrink = 1.0 if attempt < 15 else max(0.5, 1.0 - 0.02 * (attempt - 14))
        label = np.full((h, w), -1, dtype=np.int16)
        full_area, geom = [], []
        for i, c in enumerate(classes):
            s = rng.uniform(spec.min_size, spec.max_size) * shrink
            cx = rng.uniform(s / 2, w - s / 2)
            cy = rng.uniform(s / 2, h - s / 2)
            angle = rng.uniform(-np.pi / 12, np.pi / 12)
            m = shape_mask(styles[c].shape, h, w, cx, cy, s, angle, rng)
            label[m > 0] = i
            full_area.append(int(m.sum()))
            geom.append((cx, cy, s, angle, m))
        anns = []
        for i, c in enumerate(classes):
            vis = (label == i).astype(np.uint8)
            area = int(vis.sum())
            # Mostly visible only: a sliver left by occlusion is not a learnable instance.
            if area < max(spec.min_visible_px, spec.min_visible_frac * full_area[i]):
                break
            if check_detail and not _detail_visible(styles[c], geom[i], vis, h, w, spec):
                break
            polys = visible_polygons(vis)
            if not polys:
                break
            ys, xs = np.nonzero(vis)
            x0, y0 = int(xs.min()), int(ys.min())
            bbox = [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]
            anns.append((i, polys, area, bbox))
        if len(anns) == n:
            break
    else:
        raise RuntimeError(f"could not lay out {n} objects in a {w}x{h} image; lower max_objects")

    img = background(h, w, rng)
    for i, c in enumerate(classes):
        st = styles[c]
        where = label == i
        base = np.clip(np.array(st.rgb, np.float64) + rng.uniform(-15, 15, size=3), 0, 255)
        img[where] = base
        tex = texture_mask(st.texture, h, w, spec.texture_scale, rng)
        if tex is not None:
            img[where & tex] = base * _SHADE
        cx, cy, s, angle, _ = geom[i]
        mark = detail_mask(st.detail, st.shape, h, w, cx, cy, s, angle)
        if mark is not None:
            img[where & mark] = base * _SHADE
    img += rng.normal(0.0, 5.0, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), anns


def _detail_visible(style, geom, vis, h, w, spec) -> bool:
    cx, cy, s, angle, full = geom
    region = detail_mask(style.detail, style.shape, h, w, cx, cy, s, angle)
    if region is None:  # a parent: its centre must show that it has no detail
        region = detail_mask("dot", style.shape, h, w, cx, cy, s, angle)
    region = region & (full > 0)
    total = int(region.sum())
    return total == 0 or int((region & (vis > 0)).sum()) >= spec.min_detail_visible * total
