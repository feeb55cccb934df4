#!/usr/bin/env python
"""Export a (DisAlign) Mask R-CNN for deployment with detectron2's TracingAdapter, check that the
exported model gives the eager model's detections, and time both.

    python tools/export_model.py --config-file configs/LVIS/synthetic/disalign_synth.yaml \\
        --output output/export --check 8 --benchmark 8 \\
        MODEL.WEIGHTS output/demo/disalign/model_final.pth

Writes OUTPUT/model.ts (TorchScript; ``--format onnx``: OUTPUT/model.onnx, needs the ``onnx``
package) and OUTPUT/export.json (the input format and test-time resize the model expects, the
order of its outputs). The traced model takes one (3, H, W) float image, already resized to the
test size, in ``INPUT.FORMAT``, and returns ``(pred_boxes (R, 4), pred_classes (R,),
pred_masks (R, 1, M, M), scores (R,), image_size (2,))`` in that image's coordinates;
:class:`ExportedPredictor` does the resize and the pasting of the masks, as ``DefaultPredictor``
does for the eager model.

``--sample-image`` (files) or, by default, the first images of the config's first test set are
traced on (first image) and compared on (``--check N``): boxes and scores within 1e-4, the same
classes, mask IoU > 0.99 on the pasted masks, or exit status 1. ``--benchmark N`` times the eager
and the exported model on N images in this run (median seconds per image, after a warm-up).
"""

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings

# Known third-party deprecation noise hidden (disalign_det.utils.warnings); before the import.
os.environ.setdefault("DISALIGN_QUIET_WARNINGS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import disalign_det  # noqa: E402  (a real _C or the stand-in, registrations)

disalign_det.compat.apply_legacy_shims()  # numpy aliases: detectron2 v0.6's loader, lvis

logger = logging.getLogger("disalign_det.export_model")

# The tolerances of the exported-vs-eager check (the issue's deployment criterion).
BOX_ATOL = 1e-4
SCORE_ATOL = 1e-4
MIN_MASK_IOU = 0.99
OUTPUT_FIELDS = ("pred_boxes", "pred_classes", "pred_masks", "scores")  # flattened order


def export_api():
    """detectron2's ``TracingAdapter``, or raise RuntimeError saying why it is unusable (the
    export package of detectron2 v0.6 imports caffe2 unconditionally; current main does not)."""
    try:
        from detectron2.export import TracingAdapter
    except ImportError as e:
        raise RuntimeError(
            f"detectron2.export cannot be imported here ({type(e).__name__}: {e}); detectron2 "
            "v0.6's export package needs caffe2. Export with detectron2 built from current main."
        ) from e
    return TracingAdapter


def setup_cfg(config_file, opts):
    """The config of the model to export, on CPU when there is no GPU."""
    from disalign_det.config import get_inference_cfg
    from disalign_det.data import register_datasets_from_cfg

    cfg = get_inference_cfg(config_file, opts)
    cfg.freeze()
    register_datasets_from_cfg(cfg)
    return cfg


def build_eager_model(cfg):
    """The model of ``cfg`` in eval mode with ``MODEL.WEIGHTS`` loaded (as DefaultPredictor)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting a randomly initialised model")
    return model


def prepare_input(cfg, image):
    """(H, W, 3) uint8 image in BGR (``cv2.imread``), as DefaultPredictor prepares it ->
    ``{"image": (3, h, w) float32 in INPUT.FORMAT at the test size, "height": H, "width": W}``."""
    import detectron2.data.transforms as T

    if cfg.INPUT.FORMAT == "RGB":
        image = image[:, :, ::-1]
    resize = T.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )
    height, width = image.shape[:2]
    resized = resize.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(resized).astype("float32").transpose(2, 0, 1))
    return {"image": tensor, "height": height, "width": width}


def sample_images(cfg, paths, num):
    """``num`` BGR images: the files in ``paths``, else the first of ``DATASETS.TEST[0]``."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    if not paths:
        if not cfg.DATASETS.TEST:
            raise ValueError(
                "Give --sample-image, or a config with DATASETS.TEST to take them from"
            )
        paths = [d["file_name"] for d in DatasetCatalog.get(cfg.DATASETS.TEST[0])[:num]]
    return [(p, read_image(p, format="BGR")) for p in paths[:num]]


def _raw_inference(model, inputs):
    # Everything but the pasting of the masks and the rescaling to the original size: those are
    # Python-side (detector_postprocess), as in detectron2's own export tool.
    inst = model.inference(inputs, do_postprocess=False)[0]
    return [{"instances": inst}]


def trace_model(model, sample_input):
    """(TracingAdapter, traced module) for ``model`` traced on one prepared input."""
    TracingAdapter = export_api()
    adapter = TracingAdapter(model, [{"image": sample_input["image"]}], _raw_inference)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns at each Python branch on a shape (class-agnostic mask or not, empty
        # or not): constants of the model here. Whether the trace generalises is what the
        # exported-vs-eager check (and tests/test_export.py, on other sizes and counts) measures.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(adapter, adapter.flattened_inputs)
    return adapter, traced


def export(cfg, model, sample_input, output_dir, fmt="torchscript"):
    """Trace ``model`` and write it (``model.ts`` or ``model.onnx``) and ``export.json`` under
    ``output_dir``. Returns (path, adapter, traced module)."""
    os.makedirs(output_dir, exist_ok=True)
    adapter, traced = trace_model(model, sample_input)
    if fmt == "torchscript":
        path = os.path.join(output_dir, "model.ts")
        traced.save(path)
    elif fmt == "onnx":
        try:
            import onnx  # noqa: F401  (torch.onnx.export needs it)
        except ImportError as e:
            raise RuntimeError("--format onnx needs the onnx package: pip install onnx") from e
        from detectron2.export import STABLE_ONNX_OPSET_VERSION

        path = os.path.join(output_dir, "model.onnx")
        with torch.no_grad():
            torch.onnx.export(
                adapter,
                adapter.flattened_inputs,
                path,
                opset_version=STABLE_ONNX_OPSET_VERSION,
                dynamo=False,
            )
    else:
        raise ValueError(f"--format must be torchscript or onnx, got {fmt!r}")
    meta = {
        "format": fmt,
        "model_file": os.path.basename(path),
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
        "outputs": list(OUTPUT_FIELDS),
        "traced_on_size": list(sample_input["image"].shape[1:]),
    }
    with open(os.path.join(output_dir, "export.json"), "w") as f:
        json.dump(meta, f, indent=2)
    logger.info("Exported %s to %s", fmt, path)
    return path, adapter, traced


def outputs_to_instances(outputs, image_size):
    """The traced model's flat outputs -> ``Instances`` of the (resized) input image."""
    from detectron2.structures import Boxes, Instances

    boxes, classes, masks, scores = outputs[: len(OUTPUT_FIELDS)]
    return Instances(
        tuple(int(x) for x in image_size),
        pred_boxes=Boxes(boxes),
        pred_classes=classes,
        pred_masks=masks,
        scores=scores,
    )


class ExportedPredictor:
    """``DefaultPredictor`` for an exported TorchScript model: BGR image in, ``{"instances":
    Instances}`` at the original size out (boxes rescaled, masks pasted)."""

    def __init__(self, export_dir):
        with open(os.path.join(export_dir, "export.json")) as f:
            self.meta = json.load(f)
        if self.meta["format"] != "torchscript":
            raise ValueError(f"{export_dir}: ExportedPredictor runs the torchscript format only")
        self.model = torch.jit.load(os.path.join(export_dir, self.meta["model_file"]))

    def _input(self, image):
        from detectron2.config import CfgNode

        m = self.meta
        cfg = CfgNode(
            {"INPUT": {"FORMAT": m["input_format"], "MIN_SIZE_TEST": m["min_size_test"],
                       "MAX_SIZE_TEST": m["max_size_test"]}}  # fmt: skip
        )
        return prepare_input(cfg, image)

    def __call__(self, image):
        from detectron2.modeling.postprocessing import detector_postprocess

        inp = self._input(image)
        with torch.no_grad():
            raw = outputs_to_instances(self.model(inp["image"]), inp["image"].shape[1:])
        return {"instances": detector_postprocess(raw, inp["height"], inp["width"])}


def run_exported(traced, inp):
    """Exported model on a prepared input -> Instances at the original size."""
    from detectron2.modeling.postprocessing import detector_postprocess

    with torch.no_grad():
        raw = outputs_to_instances(traced(inp["image"]), inp["image"].shape[1:])
    return detector_postprocess(raw, inp["height"], inp["width"])


def run_eager(model, inp):
    """Eager model on a prepared input -> Instances at the original size (its full forward)."""
    with torch.no_grad():
        return model([inp])[0]["instances"]


def compare_instances(eager, exported):
    """Exported-vs-eager differences of one image's detections (both at the original size):
    dict(num, same_count, classes_equal, max_box_diff, max_score_diff, min_mask_iou)."""
    ret = {"num": len(eager), "same_count": len(eager) == len(exported)}
    if not ret["same_count"]:
        return {**ret, "classes_equal": False, "max_box_diff": float("inf"),
                "max_score_diff": float("inf"), "min_mask_iou": 0.0}  # fmt: skip
    ret["classes_equal"] = bool(torch.equal(eager.pred_classes, exported.pred_classes))
    if len(eager) == 0:
        return {**ret, "max_box_diff": 0.0, "max_score_diff": 0.0, "min_mask_iou": 1.0}
    ret["max_box_diff"] = float((eager.pred_boxes.tensor - exported.pred_boxes.tensor).abs().max())
    ret["max_score_diff"] = float((eager.scores - exported.scores).abs().max())
    ret["min_mask_iou"] = 1.0
    if eager.has("pred_masks"):
        a = eager.pred_masks.flatten(1).bool()
        b = exported.pred_masks.flatten(1).bool()
        inter = (a & b).sum(1).double()
        union = (a | b).sum(1).double()
        # Two empty masks agree completely.
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        ret["min_mask_iou"] = float(iou.min())
    return ret


def summarize(comparisons):
    """The worst case over images, and whether it meets the tolerances."""
    worst = {
        "images": len(comparisons),
        "detections": sum(c["num"] for c in comparisons),
        "same_count": all(c["same_count"] for c in comparisons),
        "classes_equal": all(c["classes_equal"] for c in comparisons),
        "max_box_diff": max((c["max_box_diff"] for c in comparisons), default=0.0),
        "max_score_diff": max((c["max_score_diff"] for c in comparisons), default=0.0),
        "min_mask_iou": min((c["min_mask_iou"] for c in comparisons), default=1.0),
    }
    worst["ok"] = bool(
        worst["same_count"]
        and worst["classes_equal"]
        and worst["max_box_diff"] <= BOX_ATOL
        and worst["max_score_diff"] <= SCORE_ATOL
        and worst["min_mask_iou"] > MIN_MASK_IOU
    )
    return worst


def benchmark(model, traced, inputs, warmup=2):
    """Median seconds per image of the eager and the exported model on ``inputs`` (the same
    prepared inputs, interleaved image by image so both see the same machine load)."""
    for inp in inputs[:warmup]:
        run_eager(model, inp)
        run_exported(traced, inp)
    eager_t, exported_t = [], []
    for inp in inputs:
        t0 = time.perf_counter()
        run_eager(model, inp)
        t1 = time.perf_counter()
        run_exported(traced, inp)
        t2 = time.perf_counter()
        eager_t.append(t1 - t0)
        exported_t.append(t2 - t1)
    eager_s, exported_s = statistics.median(eager_t), statistics.median(exported_t)
    return {
        "images": len(inputs),
        "eager_s_per_image": eager_s,
        "exported_s_per_image": exported_s,
        "exported_over_eager": exported_s / eager_s,
        "torch_threads": torch.get_num_threads(),
    }


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, help="folder for the exported model")
    parser.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript")
    parser.add_argument(
        "--export-method", choices=("tracing",), default="tracing",
        help="tracing (TracingAdapter + torch.jit.trace): the method the DisAlign model supports",
    )  # fmt: skip
    parser.add_argument("--sample-image", nargs="*", default=[], help="image files (BGR read)")
    parser.add_argument("--check", type=int, default=4, help="images to compare on (0: none)")
    parser.add_argument("--benchmark", type=int, default=0, help="images to time both on")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def main(argv=None):
    from detectron2.utils.logger import setup_logger

    args = get_parser().parse_args(argv)
    setup_logger(name="disalign_det")
    # torch.fx logs a deprecation notice through logging (not warnings) while detectron2 traces.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    cfg = setup_cfg(args.config_file, args.opts)
    model = build_eager_model(cfg)
    num = max(args.check, args.benchmark, 1)
    images = sample_images(cfg, args.sample_image, num)
    inputs = [prepare_input(cfg, img) for _, img in images]
    path, adapter, traced = export(cfg, model, inputs[0], args.output, args.format)
    print(f"exported: {path}")
    status = 0
    report = {"model": path}
    if args.format == "torchscript":
        traced = torch.jit.load(path)  # check what was written, not the in-memory trace
        if args.check:
            worst = summarize(
                [compare_instances(run_eager(model, i), run_exported(traced, i))
                 for i in inputs[: args.check]]  # fmt: skip
            )
            report["check"] = worst
            print(
                f"exported vs eager on {worst['images']} images ({worst['detections']} "
                f"detections): max |box diff| {worst['max_box_diff']:.3g}, max |score diff| "
                f"{worst['max_score_diff']:.3g}, classes identical: {worst['classes_equal']}, "
                f"min mask IoU {worst['min_mask_iou']:.4f} -> {'OK' if worst['ok'] else 'FAIL'}"
            )
            status = 0 if worst["ok"] else 1
        if args.benchmark:
            b = benchmark(model, traced, inputs[: args.benchmark])
            report["benchmark"] = b
            print(
                f"CPU inference per image ({b['images']} images, {b['torch_threads']} threads, "
                f"median): eager {b['eager_s_per_image'] * 1000:.1f} ms, exported "
                f"{b['exported_s_per_image'] * 1000:.1f} ms, exported/eager "
                f"{b['exported_over_eager']:.3f}"
            )
    with open(os.path.join(args.output, "export_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main())
