#!/usr/bin/env python
"""Check an ADE20K (SceneParsing, ADEChallengeData2016) download before training, and optionally
write the label maps detectron2's built-in ``ade20k_sem_seg_{train,val}`` read.

    python datasets/prepare_ade20k.py [--root DIR] [--convert] [--check-labels N|all]

Expected layout (``DIR`` defaults to ``$DETECTRON2_DATASETS``, else ``datasets``)::

    DIR/ADEChallengeData2016/images/{training,validation}/ADE_*.jpg        (20210 / 2000)
    DIR/ADEChallengeData2016/annotations/{training,validation}/ADE_*.png   (the download's)
    DIR/ADEChallengeData2016/annotations_detectron2/{training,validation}/ADE_*.png
    DIR/ADEChallengeData2016/objectInfo150.txt   (ratios r_c, MODEL.DISALIGN.PIXEL_RATIOS_FILE)

``annotations_detectron2`` is what detectron2's ``datasets/prepare_ade20k_sem_seg.py`` writes:
label ``v - 1`` for the download's ``v`` in 1..150 and 255 (ignored) for 0 ("other"). ``--convert``
writes the missing ones the same way. Exits 0 when everything is in place, 1 with a list naming
exactly what is missing otherwise. Needs numpy and Pillow only.
"""

import argparse
import os
import sys

DOWNLOAD = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
SPLITS = {"training": 20210, "validation": 2000}
NUM_CLASSES = 150
IGNORE = 255


def _stems(folder, ext):
    if not os.path.isdir(folder):
        return None
    return {os.path.splitext(f)[0] for f in os.listdir(folder) if f.endswith(ext)}


def convert_label(src, dst):
    """The download's label map (0 = other, 1..150) -> detectron2's (255, 0..149)."""
    import numpy as np
    from PIL import Image

    label = np.asarray(Image.open(src)).astype(np.int64)
    out = np.where(label == 0, IGNORE, label - 1).astype(np.uint8)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    Image.fromarray(out).save(dst)


def check(root, convert=False, check_labels=20):
    """List of problems (empty: ready)."""
    import numpy as np
    from PIL import Image

    ade = os.path.join(root, "ADEChallengeData2016")
    problems = []
    if not os.path.isdir(ade):
        return [f"{ade} is missing: download and unzip {DOWNLOAD} into {root}"]
    for split, expected in SPLITS.items():
        images = _stems(os.path.join(ade, "images", split), ".jpg")
        raw = _stems(os.path.join(ade, "annotations", split), ".png")
        d2_dir = os.path.join(ade, "annotations_detectron2", split)
        if images is None:
            problems.append(f"images/{split}/ is missing")
            continue
        if len(images) != expected:
            problems.append(f"images/{split}/ has {len(images)} images, ADE20K has {expected}")
        if convert and raw is not None:
            done = _stems(d2_dir, ".png") or set()
            for stem in sorted(raw - done):
                convert_label(
                    os.path.join(ade, "annotations", split, stem + ".png"),
                    os.path.join(d2_dir, stem + ".png"),
                )
        labels = _stems(d2_dir, ".png")
        if labels is None:
            problems.append(
                f"annotations_detectron2/{split}/ is missing: run this script with --convert "
                "(or detectron2's datasets/prepare_ade20k_sem_seg.py)"
            )
            continue
        missing = sorted(images - labels)
        if missing:
            problems.append(
                f"annotations_detectron2/{split}/ lacks {len(missing)} label maps (e.g. "
                f"{missing[0]}.png)"
            )
        stems = sorted(labels)
        n = len(stems) if check_labels is None else min(check_labels, len(stems))
        step = max(1, len(stems) // max(1, n))
        for stem in stems[::step][:n]:
            values = np.unique(np.asarray(Image.open(os.path.join(d2_dir, stem + ".png"))))
            bad = values[(values >= NUM_CLASSES) & (values != IGNORE)]
            if bad.size:
                problems.append(
                    f"annotations_detectron2/{split}/{stem}.png holds labels {bad.tolist()}: not "
                    "converted (expected 0..149 and 255)"
                )
    info = os.path.join(ade, "objectInfo150.txt")
    if not os.path.isfile(info):
        problems.append(
            "objectInfo150.txt is missing (the pixel ratios of the DisAlign stage-two configs' "
            "MODEL.DISALIGN.PIXEL_RATIOS_FILE; set that key to '' to count them instead)"
        )
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"))
    parser.add_argument("--convert", action="store_true", help="write annotations_detectron2")
    parser.add_argument(
        "--check-labels", default="20", help="label maps per split whose values are checked, or all"
    )
    args = parser.parse_args(argv)
    n = None if args.check_labels == "all" else int(args.check_labels)
    problems = check(args.root, args.convert, n)
    if problems:
        print("ADE20K is not ready:\n" + "\n".join(f"  - {p}" for p in problems))
        return 1
    print(f"ADE20K is ready under {os.path.join(args.root, 'ADEChallengeData2016')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
