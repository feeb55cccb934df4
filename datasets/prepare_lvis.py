#!/usr/bin/env python
"""Check an LVIS v1.0 or v0.5 download before training: files, json fields, image paths, r/c/f.

    python datasets/prepare_lvis.py [--root DIR] [--version auto|1.0|0.5] [--check-images N|all]
                                    [--splits train val]

Expected layout (``DIR`` defaults to ``$DETECTRON2_DATASETS``, else ``datasets``), detectron2's
own paths for ``lvis_v1_{train,val}`` and ``lvis_v0.5_{train,val}``::

    DIR/lvis/lvis_v1_train.json   DIR/lvis/lvis_v1_val.json      (v1.0, 1203 classes)
    DIR/lvis/lvis_v0.5_train.json DIR/lvis/lvis_v0.5_val.json    (v0.5, 1230 classes)
    DIR/coco/train2017/*.jpg      DIR/coco/val2017/*.jpg

``--version auto`` (the default) checks every version whose json files are present (v1.0 when none
is). Image paths follow detectron2's LVIS loader exactly: ``DIR/coco/`` + the folder and file name
at the end of each image's ``coco_url`` (LVIS val also uses COCO train2017 images). Exits 0 when
everything checked is in place, 1 with a list naming exactly what is missing otherwise.

Only the standard library is used, so this runs before detectron2 is installed.
"""

import argparse
import json
import os
import sys
from collections import Counter

DOWNLOADS = {
    "lvis/lvis_v1_train.json": "https://dl.fbaipublicfiles.com/LVIS/lvis_v1_train.json.zip",
    "lvis/lvis_v1_val.json": "https://dl.fbaipublicfiles.com/LVIS/lvis_v1_val.json.zip",
    "lvis/lvis_v0.5_train.json": "https://dl.fbaipublicfiles.com/LVIS/lvis_v0.5_train.json.zip",
    "lvis/lvis_v0.5_val.json": "https://dl.fbaipublicfiles.com/LVIS/lvis_v0.5_val.json.zip",
    "coco/train2017": "http://images.cocodataset.org/zips/train2017.zip",
    "coco/val2017": "http://images.cocodataset.org/zips/val2017.zip",
}
# Per version: json name prefix (detectron2's dataset names), class count and the real categories'
# frequency buckets (rare, common, frequent).
VERSIONS = {
    "1.0": {"prefix": "lvis_v1", "num_classes": 1203, "buckets": {"r": 337, "c": 461, "f": 405}},
    "0.5": {"prefix": "lvis_v0.5", "num_classes": 1230, "buckets": {"r": 454, "c": 461, "f": 315}},
}

REQUIRED = {
    "images": ("id", "width", "height", "coco_url"),
    "annotations": ("id", "image_id", "category_id", "segmentation", "area", "bbox"),
    "categories": ("id", "name"),
}


def _bucket(image_count):
    # LVIS: rare 1-10 training images, common 11-100, frequent > 100.
    return "r" if image_count <= 10 else ("c" if image_count <= 100 else "f")


def _image_path(image_root, img):
    # The same rule as detectron2.data.datasets.lvis.load_lvis_json (string concatenation).
    folder, name = img["coco_url"].split("/")[-2:]
    return os.path.join(image_root + folder, name)


def _sample(items, n):
    if n is None or n >= len(items):
        return list(items)
    # Evenly spaced, so the check is deterministic and covers the whole list.
    step = len(items) / float(n)
    return [items[int(i * step)] for i in range(n)]


def json_relpath(version, split):
    """``lvis/<prefix>_<split>.json``: where detectron2's built-in dataset of that version looks."""
    return f"lvis/{VERSIONS[version]['prefix']}_{split}.json"


def detect_versions(root, splits):
    """The versions whose json of any of ``splits`` exists under ``root`` (["1.0"] if none)."""
    found = [
        v
        for v in VERSIONS
        if any(os.path.isfile(os.path.join(root, json_relpath(v, s))) for s in splits)
    ]
    return found or ["1.0"]


def check_split(root, split, check_images, out, version="1.0"):
    """Check one split; returns a list of problems (strings) and prints a summary to ``out``."""
    problems = []
    rel = json_relpath(version, split)
    json_file = os.path.join(root, rel)
    if not os.path.isfile(json_file):
        return [f"missing {json_file} (download {DOWNLOADS[rel]} and unzip it into {root}/lvis/)"]
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        return [f"{json_file} does not parse as json: {e}"]
    if not isinstance(data, dict):
        return [f"{json_file}: top level is not an object"]
    missing_keys = [k for k in REQUIRED if k not in data]
    if missing_keys:
        return [f"{json_file}: missing top-level key(s) {missing_keys}"]

    for key, fields in REQUIRED.items():
        lacking = Counter()
        first = {}
        for i, rec in enumerate(data[key]):
            for fld in fields:
                if fld not in rec:
                    lacking[fld] += 1
                    first.setdefault(fld, i)
        for fld, n in sorted(lacking.items()):
            problems.append(
                f"{json_file}: {n} of {len(data[key])} {key} lack field '{fld}' "
                f"(first: {key}[{first[fld]}])"
            )
    if problems:
        return problems

    cats = data["categories"]
    ids = sorted(c["id"] for c in cats)
    if ids != list(range(1, len(ids) + 1)):
        problems.append(f"{json_file}: category ids are not contiguous 1..{len(ids)}")
    id_set = set(ids)
    unknown = sum(1 for a in data["annotations"] if a["category_id"] not in id_set)
    if unknown:
        problems.append(f"{json_file}: {unknown} annotations have a category_id not in categories")

    image_root = os.path.join(root, "coco", "")
    imgs = data["images"]
    to_check = _sample(imgs, check_images)
    missing = [p for p in (_image_path(image_root, im) for im in to_check) if not os.path.isfile(p)]
    if missing:
        folders = sorted({os.path.dirname(p) for p in missing})
        absent = [d for d in folders if not os.path.isdir(d)]
        hint = ""
        for d in absent:
            key = "coco/" + os.path.basename(d)
            hint += f"; folder {d} does not exist" + (
                f" (download {DOWNLOADS[key]})" if key in DOWNLOADS else ""
            )
        problems.append(
            f"{split}: {len(missing)} of {len(to_check)} checked images are missing, e.g. "
            + ", ".join(missing[:5])
            + hint
        )

    if all(c.get("frequency") in ("r", "c", "f") for c in cats):
        freq = Counter(c["frequency"] for c in cats)
        how = "json 'frequency' fields"
    else:
        per_cat = {}
        for a in data["annotations"]:
            per_cat.setdefault(a["category_id"], set()).add(a["image_id"])
        freq = Counter(_bucket(len(per_cat.get(i, ()))) for i in ids)
        how = "counted from this split's annotations"
    spec = VERSIONS[version]
    print(
        f"[{split}] {json_file}: {len(imgs)} images, {len(data['annotations'])} annotations, "
        f"{len(cats)} categories; rare/common/frequent = {freq['r']}/{freq['c']}/{freq['f']} "
        f"({how}); {len(to_check) - len(missing)}/{len(to_check)} checked images found",
        file=out,
    )
    real = spec["buckets"]
    if len(cats) == spec["num_classes"] and any(freq[b] != n for b, n in real.items()):
        print(
            f"[{split}] warning: LVIS v{version} has r/c/f = {real['r']}/{real['c']}/{real['f']}; "
            "this json differs",
            file=out,
        )
    return problems


def _check_images_arg(value):
    if value == "all":
        return None
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError("--check-images must be >= 0 or 'all'")
    return n


def main(argv=None, out=None):
    """Run the checks; returns the exit status (0 ok, 1 problems found)."""
    out = out or sys.stdout
    p = argparse.ArgumentParser(
        description="Check an LVIS v1.0 / v0.5 download (see datasets/README.md)"
    )
    p.add_argument(
        "--root",
        default=os.getenv("DETECTRON2_DATASETS", "datasets"),
        help="datasets root holding lvis/ and coco/ (default: $DETECTRON2_DATASETS or 'datasets')",
    )
    p.add_argument(
        "--check-images",
        type=_check_images_arg,
        default=200,
        metavar="N|all",
        help="check that N evenly spaced images per split exist (default 200), or 'all'",
    )
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    p.add_argument(
        "--version",
        choices=["auto", *VERSIONS],
        default="auto",
        help="LVIS version to check (default auto: each one whose json files are present)",
    )
    args = p.parse_args(argv)

    if not os.path.isdir(args.root):
        print(
            f"FAILED: datasets root {args.root} does not exist (set --root or DETECTRON2_DATASETS; "
            "see datasets/README.md)",
            file=out,
        )
        return 1
    versions = detect_versions(args.root, args.splits) if args.version == "auto" else [args.version]
    problems = []
    for version in versions:
        for split in args.splits:
            problems += check_split(args.root, split, args.check_images, out, version)
    if problems:
        print(f"FAILED: {len(problems)} problem(s):", file=out)
        for msg in problems:
            print(f"  - {msg}", file=out)
        print("See datasets/README.md for the expected layout.", file=out)
        return 1
    for version in versions:
        print(
            f"OK: LVIS v{version} under {args.root} is ready ({', '.join(args.splits)})", file=out
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
