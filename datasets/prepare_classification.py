#!/usr/bin/env python
"""Check an ImageNet-LT, Places-LT or iNaturalist 2018 download before training: list / json
files, their format, class counts, the many / medium / few split of the training counts, image
paths.

    python datasets/prepare_classification.py [--root DIR] [--check-images N|all]
        [--datasets imagenet_lt places_lt inat2018]

Expected layout (``DIR`` defaults to ``$DETECTRON2_DATASETS``, else ``datasets``), the paths of the
built-in names registered by ``disalign_det.data.classification``::

    DIR/ImageNet_LT/ImageNet_LT_{train,val,test}.txt   DIR/imagenet/{train,val}/...
    DIR/Places_LT/Places_LT_{train,val,test}.txt       DIR/places365/{data_256,val_256}/...
    DIR/inaturalist2018/{train2018,val2018}.json       DIR/inaturalist2018/train_val2018/...

List lines are ``relative/path label``; the lists are those of OLTR (Liu et al. 2019), e.g. from
https://github.com/zhmiao/OpenLongTailRecognition-OLTR. Exits 0 when everything checked is in
place, 1 with a list naming what is missing or malformed. Standard library only.
"""

import argparse
import json
import os
import sys

# name -> (kind, {split: relative file}, image root, classes, {split: expected images})
DATASETS = {
    "imagenet_lt": (
        "list",
        {s: f"ImageNet_LT/ImageNet_LT_{s}.txt" for s in ("train", "val", "test")},
        "imagenet",
        1000,
        {"train": 115846, "val": 20000, "test": 50000},
    ),
    "places_lt": (
        "list",
        {s: f"Places_LT/Places_LT_{s}.txt" for s in ("train", "val", "test")},
        "places365",
        365,
        {"train": 62500, "val": 7300, "test": 36500},
    ),
    "inat2018": (
        "inat",
        {s: f"inaturalist2018/{s}2018.json" for s in ("train", "val")},
        "inaturalist2018",
        8142,
        {"train": 437513, "val": 24426},
    ),
}


def read_list(path):
    """[(relative path, label)]; ValueError naming the line for a malformed one."""
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{path}:{lineno}: expected 'relative/path label', got {line!r}")
            out.append((parts[0].lstrip("/"), int(parts[1])))
    return out


def read_inat(path):
    with open(path) as f:
        data = json.load(f)
    label = {a["image_id"]: a["category_id"] for a in data["annotations"]}
    return [(img["file_name"], label[img["id"]]) for img in data["images"]]


def check(root, name, num_images_to_check):
    kind, files, image_root, num_classes, expected = DATASETS[name]
    problems = []
    counts = None
    for split, rel in files.items():
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            problems.append(f"missing {path}")
            continue
        try:
            items = (read_list if kind == "list" else read_inat)(path)
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            problems.append(f"malformed {path}: {e}")
            continue
        labels = [lab for _, lab in items]
        if len(items) != expected[split]:
            problems.append(f"{path}: {len(items)} images, expected {expected[split]}")
        if labels and max(labels) >= num_classes:
            problems.append(f"{path}: label {max(labels)} >= {num_classes} classes")
        if split == "train":
            counts = [0] * num_classes
            for lab in labels:
                if 0 <= lab < num_classes:
                    counts[lab] += 1
        chosen = items if num_images_to_check is None else items[:num_images_to_check]
        missing = [p for p, _ in chosen if not os.path.isfile(os.path.join(root, image_root, p))]
        if missing:
            problems.append(
                f"{len(missing)} of {len(chosen)} checked images of {split} missing under "
                f"{os.path.join(root, image_root)} (e.g. {missing[0]})"
            )
        print(f"{name} {split}: {len(items)} images, {len(set(labels))} classes")
    if counts is not None:
        many = sum(c > 100 for c in counts)
        few = sum(c < 20 for c in counts)
        print(
            f"{name} train: {min(counts)}-{max(counts)} images per class; many (>100) {many}, "
            f"medium {num_classes - many - few}, few (<20) {few}"
        )
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"))
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=None)
    parser.add_argument(
        "--check-images", default="100", help="images per split to look for, or all"
    )
    args = parser.parse_args(argv)
    n = None if args.check_images == "all" else int(args.check_images)
    names = (
        args.datasets
        or [
            d
            for d, v in DATASETS.items()
            if any(os.path.exists(os.path.join(args.root, f)) for f in v[1].values())
        ]
        or sorted(DATASETS)
    )
    problems = []
    for name in names:
        problems += check(args.root, name, n)
    if problems:
        print("NOT READY:\n  " + "\n  ".join(problems))
        return 1
    print("OK: " + ", ".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
