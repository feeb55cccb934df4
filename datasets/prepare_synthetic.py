#!/usr/bin/env python
"""Generate the synthetic long-tailed LVIS-format dataset (disalign_det.data.synthetic).

    python datasets/prepare_synthetic.py [--preset basic|lvis] [--out DIR] [--seed 0] [...]

``--out`` defaults to where the built-in datasets are generated on first use:
``$DETECTRON2_DATASETS/lvis_synth`` (preset basic, ``lvis_synth_{train,val}``) or
``$DETECTRON2_DATASETS/lvis_synth_lt`` (preset lvis, ``lvis_synth_lt_{train,val}``), with
``$DETECTRON2_DATASETS`` defaulting to ``datasets``. Options left out take the preset's defaults;
the same options and seed always give byte-identical files. Prints a summary (sizes, r/c/f buckets).
A copy written elsewhere or with other options is registered like any LVIS-format json, e.g.
``DATASETS.LVIS_FORMAT "(('synth1_train', 'DIR/lvis_synth_train.json', 'DIR/images/'),)"``.
"""

import argparse
import os
import sys
import time

from disalign_det.data import synthetic

DEFAULT_SUBDIRS = {"basic": "lvis_synth", "lvis": synthetic.LT_SUBDIR}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(synthetic.PRESETS), default="basic")
    p.add_argument("--out", default=None, help="output folder (default: see above)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--num-train", type=int, default=None)
    p.add_argument("--num-val", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--max-objects", type=int, default=None)
    p.add_argument("--min-val-images", type=int, default=None)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or os.path.join(
        os.environ.get("DETECTRON2_DATASETS", "datasets"), DEFAULT_SUBDIRS[args.preset]
    )
    t0 = time.perf_counter()
    try:
        paths = synthetic.generate_synthetic_lvis(
            out,
            preset=args.preset,
            seed=args.seed,
            num_classes=args.num_classes,
            num_train_images=args.num_train,
            num_val_images=args.num_val,
            image_size=args.image_size,
            max_objects_per_image=args.max_objects,
            min_val_images=args.min_val_images,
        )
    except ValueError as e:
        print(f"prepare_synthetic.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {paths['train_json']} and {paths['val_json']} ({time.perf_counter() - t0:.1f} s)")
    print(f"image_root: {paths['image_root']}")
    print(synthetic.summarize(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
