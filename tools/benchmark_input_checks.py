#!/usr/bin/env python
"""Cost of the input checks of docs/errors.md at LVIS v1 train scale.

Generates an LVIS-format json with ``--annotations`` annotations (default 1.27M, LVIS v1 train) on
``--images`` images (default 100k), each annotation one polygon of ``--coords`` coordinates, writes
it, reads it back with ``json.load`` (so the values are the objects a real json gives) and times

* the structural check (``validate_lvis_dict``, existed before) and
* the value check (``find_invalid_annotations``: bbox, polygons, area, image sizes),

then creates ``--image-files`` empty image files and times ``check_image_files`` (one stat each).

    python tools/benchmark_input_checks.py                       # 1.27M annotations, 100k files
    python tools/benchmark_input_checks.py --annotations 100000  # smaller

Prints seconds; nothing is kept (a temporary folder).
"""

import argparse
import functools
import json
import os
import tempfile
import time

import numpy as np

import disalign_det  # noqa: F401  isort: skip  (shims)
from disalign_det.data.lvis_json import validate_lvis_dict
from disalign_det.data.validate import check_image_files, find_invalid_annotations

print = functools.partial(print, flush=True)  # progress shows when stdout is a file


def generate(num_annotations, num_images, coords, seed=0):
    """An LVIS-format dict with valid values: boxes inside 640x480 images, one polygon each."""
    rng = np.random.default_rng(seed)
    images = [
        {"id": i + 1, "width": 640, "height": 480,
         "coco_url": f"http://images.cocodataset.org/train2017/{i + 1:012d}.jpg"}
        for i in range(num_images)
    ]  # fmt: skip
    cats = [{"id": k + 1, "name": f"c{k + 1}", "frequency": "f"} for k in range(1203)]
    xy = rng.uniform(0, 300, (num_annotations, 2)).round(2)
    wh = rng.uniform(1, 150, (num_annotations, 2)).round(2)
    img = rng.integers(1, num_images + 1, num_annotations)
    cat = rng.integers(1, 1204, num_annotations)
    t = np.linspace(0, 2 * np.pi, coords // 2, endpoint=False)
    px = xy[:, :1] + wh[:, :1] / 2 * (1 + np.cos(t))  # (N, coords / 2)
    py = xy[:, 1:] + wh[:, 1:] / 2 * (1 + np.sin(t))
    polys = np.stack([px, py], 2).reshape(num_annotations, -1).round(2).tolist()
    boxes = np.concatenate([xy, wh], 1).tolist()
    areas = (wh.prod(1) * 0.78).round(2).tolist()
    anns = [
        {"id": i + 1, "image_id": int(img[i]), "category_id": int(cat[i]),
         "segmentation": [polys[i]], "area": areas[i], "bbox": boxes[i]}
        for i in range(num_annotations)
    ]  # fmt: skip
    return {"images": images, "annotations": anns, "categories": cats}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", type=int, default=1_270_000)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--coords", type=int, default=24, help="polygon coordinates per annotation")
    parser.add_argument("--image-files", type=int, default=100_000)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        data = generate(args.annotations, args.images, args.coords)
        path = os.path.join(tmp, "lvis_like.json")
        with open(path, "w") as f:
            json.dump(data, f)
        del data
        size = os.path.getsize(path) / 2**20
        took = time.perf_counter() - t
        print(f"generated {path}: {args.annotations} annotations, {args.images} images, "
              f"{args.coords} coords each, {size:.0f} MiB ({took:.1f} s)")  # fmt: skip
        t = time.perf_counter()
        with open(path) as f:
            data = json.load(f)
        print(f"json.load:                       {time.perf_counter() - t:7.2f} s")
        t = time.perf_counter()
        validate_lvis_dict(data, path)
        print(f"structure (validate_lvis_dict):  {time.perf_counter() - t:7.2f} s")
        t = time.perf_counter()
        problems, bad_images = find_invalid_annotations(data)
        took = time.perf_counter() - t
        invalid, bad = int((problems != 0).sum()), int(bad_images.sum())
        print(
            f"values (find_invalid_annotations): {took:5.2f} s ({invalid} invalid, {bad} bad imgs)"
        )
        del data

        folder = os.path.join(tmp, "images", "train2017")
        os.makedirs(folder)
        paths = [os.path.join(folder, f"{i:012d}.jpg") for i in range(args.image_files)]
        for p in paths:
            open(p, "wb").close()
        t = time.perf_counter()
        check_image_files(paths, path, os.path.join(tmp, "images", ""))
        print(f"image files ({len(paths)} stats):     {time.perf_counter() - t:7.2f} s")


if __name__ == "__main__":
    main()
