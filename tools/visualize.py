#!/usr/bin/env python
"""Draw a model's predictions (boxes, masks, class names) on images with detectron2's Visualizer.

Images given as files or folders:
    python tools/visualize.py --config-file configs/LVIS/synthetic/mask_rcnn_synth.yaml \\
        --input img1.jpg some/folder --output out/vis MODEL.WEIGHTS model_final.pth

Images of a registered dataset, ground truth drawn beside the predictions, rare classes only:
    python tools/visualize.py --config-file configs/LVIS/synthetic/disalign_synth.yaml \\
        --dataset lvis_synth_val --num 8 --show-gt --classes r --output out/vis_disalign \\
        MODEL.WEIGHTS output/synthetic/disalign/model_final.pth

Running the second command once with the stage-one weights (and its config) and once with the
DisAlign weights shows what changed for the rare classes: the same images are picked each time.
Class names and r/c/f buckets come from the dataset's metadata (``--dataset``, else the config's
first test or train set). Each output image is OUTPUT/<image name>.png (predictions on the left,
ground truth on the right with --show-gt); OUTPUT/predictions.json lists what was drawn.
"""

import argparse
import json
import logging
import os
import sys
from typing import List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))
# Known third-party deprecation noise hidden (disalign_det.utils.warnings); before the import.
os.environ.setdefault("DISALIGN_QUIET_WARNINGS", "1")

import numpy as np  # noqa: E402

import disalign_det  # noqa: E402  (a real _C or the stand-in, registrations)

disalign_det.compat.apply_legacy_shims()  # numpy aliases: detectron2 v0.6's loader, lvis

logger = logging.getLogger("disalign_det.visualize")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BUCKETS = ("r", "c", "f")


def parse_classes(spec: str) -> Optional[set]:
    """``"all"`` -> None (no filter); ``"r"``, ``"r,c"`` ... -> the set of kept buckets."""
    spec = (spec or "all").strip().lower()
    if spec == "all":
        return None
    buckets = {b.strip() for b in spec.split(",") if b.strip()}
    bad = buckets - set(BUCKETS)
    if bad:
        raise ValueError(
            f"--classes takes 'all' or buckets among r,c,f (e.g. 'r' or 'r,c'); got {spec!r}"
        )
    return buckets


def setup_cfg(config_file: str, opts: Sequence[str], confidence: float):
    """The config of the model to run, on CPU when there is no GPU."""
    from disalign_det.config import get_inference_cfg
    from disalign_det.data import register_datasets_from_cfg

    cfg = get_inference_cfg(config_file, opts)
    # Nothing below --confidence is drawn: let the model drop it early. A lower config threshold
    # only costs time; a higher one would hide detections the user asked to see.
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(confidence)
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = float(confidence)
    cfg.freeze()
    register_datasets_from_cfg(cfg)
    return cfg


def class_info(dataset: Optional[str], cfg):
    """(dataset name, class names, r/c/f bucket of each class) from the metadata."""
    from detectron2.data import MetadataCatalog

    from disalign_det.data import get_class_frequency_buckets

    name = dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else cfg.DATASETS.TRAIN[0])
    meta = MetadataCatalog.get(name)
    classes = meta.get("thing_classes")
    if classes is None:
        raise ValueError(f"Dataset '{name}' has no thing_classes in its metadata")
    if len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ValueError(
            f"Dataset '{name}' has {len(classes)} classes but the model predicts "
            f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES} (MODEL.ROI_HEADS.NUM_CLASSES)"
        )
    try:
        buckets = list(get_class_frequency_buckets(name))
    except Exception as e:  # no frequency information: nothing to filter on, but still draw
        logger.warning(
            "No r/c/f buckets for %s (%s): --classes other than 'all' keeps nothing", name, e
        )
        buckets = ["?"] * len(classes)
    return name, list(classes), buckets


def vis_metadata(classes: List[str], buckets: List[str]):
    """Metadata for the Visualizer: names suffixed with their bucket, one fixed colour per class
    (so that the same class has the same colour in a stage-one and a DisAlign picture)."""
    from detectron2.data.catalog import Metadata
    from detectron2.utils.colormap import colormap

    palette = colormap(rgb=True, maximum=255)
    return Metadata(
        name="disalign_visualize",
        thing_classes=[f"{n} [{b}]" for n, b in zip(classes, buckets)],
        thing_colors=[
            tuple(int(v) for v in palette[k % len(palette)]) for k in range(len(classes))
        ],
    )


def filter_instances(instances, confidence: float, keep_classes: Optional[set]):
    """Predictions with score >= ``confidence`` and, if ``keep_classes`` is a set of class indices,
    a predicted class in it."""
    import torch

    keep = instances.scores >= confidence
    if keep_classes is not None:
        allowed = torch.tensor(sorted(keep_classes), dtype=instances.pred_classes.dtype)
        keep &= torch.isin(instances.pred_classes, allowed)
    return instances[keep]


def list_images(inputs: Sequence[str]) -> List[str]:
    """Image files of ``inputs`` (files, or folders searched non-recursively, sorted)."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            files += sorted(
                os.path.join(path, f)
                for f in os.listdir(path)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"--input {path!r} is neither an image file nor a folder")
    if not files:
        raise FileNotFoundError(f"No image found in --input {list(inputs)}")
    return files


def dataset_records(name: str, num: int, keep_classes: Optional[set]) -> List[dict]:
    """The first ``num`` records of a registered dataset, in dataset order (so that two models
    are shown the same images); with a class filter, only images whose ground truth has such a
    class."""
    from detectron2.data import DatasetCatalog

    records = DatasetCatalog.get(name)
    if keep_classes is not None:
        records = [
            r for r in records if any(a["category_id"] in keep_classes for a in r["annotations"])
        ]
    return records[: max(0, num)]


def _visualizer_class():
    from detectron2.utils.visualizer import Visualizer

    class ClassColourVisualizer(Visualizer):
        """Visualizer drawing every instance in its class's colour exactly: the stock one jitters
        colours at random, so the same class would look different in a stage-one and a DisAlign
        picture (and between predictions and ground truth)."""

        def _jitter(self, color):
            return color

    return ClassColourVisualizer


def _caption(vis, text: str) -> None:
    """Small white-on-black caption in the top-left corner of a Visualizer's image."""
    vis.draw_text(
        text,
        (2, 2),
        font_size=vis._default_font_size * 1.2,  # about the size of the instance labels
        color="w",
        horizontal_alignment="left",
    )


def _unique_name(base: str, used: set) -> str:
    name, k = base, 1
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


def visualize(
    cfg,
    output: str,
    *,
    inputs: Sequence[str] = (),
    dataset: Optional[str] = None,
    num: int = 8,
    confidence: float = 0.3,
    classes: str = "all",
    show_gt: bool = False,
    scale: float = 1.0,
    log=print,
) -> List[dict]:
    """Draw predictions of ``cfg``'s model on ``inputs`` (files/folders) and/or ``num`` images of
    ``dataset``; returns (and writes to OUTPUT/predictions.json) one summary per image."""
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor
    from detectron2.utils.visualizer import ColorMode

    if not inputs and not dataset:
        raise ValueError("Give --input images/folders and/or --dataset NAME")
    buckets_kept = parse_classes(classes)
    ds_name, names, buckets = class_info(dataset, cfg)
    keep = None
    if buckets_kept is not None:
        keep = {k for k, b in enumerate(buckets) if b in buckets_kept}
    meta = vis_metadata(names, buckets)

    items = [(path, None) for path in list_images(inputs)] if inputs else []
    if dataset:
        records = dataset_records(dataset, num, keep)
        if not records:
            log(f"[visualize] no image of {dataset} has ground truth of classes {classes!r}")
        items += [(r["file_name"], r) for r in records]

    visualizer_cls = _visualizer_class()
    predictor = DefaultPredictor(cfg)
    input_format = cfg.INPUT.FORMAT
    os.makedirs(output, exist_ok=True)
    used, summary = set(), []
    for path, record in items:
        image = read_image(path, format=input_format)  # what DefaultPredictor expects
        rgb = image[:, :, ::-1] if input_format == "BGR" else image
        pred = predictor(image)["instances"].to("cpu")
        shown = filter_instances(pred, confidence, keep)
        vis = visualizer_cls(rgb, metadata=meta, scale=scale, instance_mode=ColorMode.SEGMENTATION)
        vis.draw_instance_predictions(shown)
        if show_gt and record is not None:
            gt = dict(record)
            gt["annotations"] = [
                a for a in record["annotations"] if keep is None or a["category_id"] in keep
            ]
            gt_vis = visualizer_cls(
                rgb, metadata=meta, scale=scale, instance_mode=ColorMode.SEGMENTATION
            )
            gt_vis.draw_dataset_dict(gt)
            # Side by side the two panels need a caption to be told apart.
            _caption(vis, f"predictions >= {confidence:g}")
            _caption(gt_vis, "ground truth")
            canvas = np.concatenate([vis.output.get_image(), gt_vis.output.get_image()], axis=1)
        else:
            canvas = vis.output.get_image()
        out_name = _unique_name(os.path.splitext(os.path.basename(path))[0], used) + ".png"
        out_path = os.path.join(output, out_name)
        from PIL import Image

        Image.fromarray(canvas).save(out_path)
        above = int((pred.scores >= confidence).sum())
        entry = {
            "image": path,
            "output": out_path,
            "num_predictions": above,
            "num_shown": len(shown),
            "shown": [
                {
                    "class": int(c),
                    "name": names[int(c)],
                    "bucket": buckets[int(c)],
                    "score": round(float(s), 4),
                    "box": [round(float(v), 1) for v in b],
                }
                for c, s, b in zip(shown.pred_classes, shown.scores, shown.pred_boxes.tensor)
            ],
        }
        if record is not None:
            entry["num_gt"] = len(record["annotations"])
        summary.append(entry)
        log(f"[visualize] {out_path}: {len(shown)} of {above} predictions >= {confidence} shown")
    with open(os.path.join(output, "predictions.json"), "w") as f:
        json.dump(
            {"dataset": ds_name, "classes": classes, "confidence": confidence, "images": summary},
            f,
            indent=1,
        )
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", default=[], help="image files and/or folders")
    parser.add_argument("--dataset", default=None, help="registered dataset to take images from")
    parser.add_argument("--num", type=int, default=8, help="number of --dataset images")
    parser.add_argument("--output", required=True, help="folder for the drawn images")
    parser.add_argument("--confidence", type=float, default=0.3, help="minimum score drawn")
    parser.add_argument(
        "--classes",
        default="all",
        help="'all' or LVIS buckets to keep, e.g. 'r' (rare only) or 'r,c'; with --dataset also "
        "picks images whose ground truth has such a class, and filters the ground truth drawn",
    )
    parser.add_argument(
        "--show-gt", action="store_true", help="draw --dataset ground truth beside predictions"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="output size / image size")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config options, e.g. MODEL.WEIGHTS path.pth"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        parse_classes(args.classes)
    except ValueError as e:
        raise SystemExit(str(e))
    cfg = setup_cfg(args.config_file, args.opts, args.confidence)
    if not cfg.MODEL.WEIGHTS:
        print("[visualize] MODEL.WEIGHTS is empty: drawing a RANDOMLY INITIALISED model")
    summary = visualize(
        cfg,
        args.output,
        inputs=args.input,
        dataset=args.dataset,
        num=args.num,
        confidence=args.confidence,
        classes=args.classes,
        show_gt=args.show_gt,
        scale=args.scale,
    )
    print(f"[visualize] {len(summary)} image(s) written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
