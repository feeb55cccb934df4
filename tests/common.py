"""Helpers shared by the tests: paths, the tiny-config options (written once here), the tiny
dataset and loading a ``datasets/`` script.

``conftest.py`` turns :func:`make_tiny_dataset` into the session fixture ``tiny_dataset`` and
re-exports these names for the test modules that import them from ``conftest``.
"""

import importlib
import importlib.util
import os
from typing import List, Optional, Sequence

import torch
from detectron2.config import get_cfg

from disalign_det import add_disalign_config
from disalign_det.data import generate_synthetic_lvis, register_lvis_format

__all__ = [
    "CONFIGS",
    "REPO",
    "TINY_CLASSES",
    "evaluate_lvis",
    "ground_truth_as_results",
    "rasterize",
    "load_script",
    "make_tiny_dataset",
    "tiny_cfg",
    "tiny_opts",
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "LVIS")
TINY_CLASSES = 6

# Hand-made (R, K + 1) = (5, 4) class logits (background last) and labels, two background RoIs,
# every z inside [-4, 10]: the stage-one loss tests write each loss's formula out on them.
HAND_LOGITS = [
    [1.0, -0.5, 0.3, 0.2],
    [-1.2, 0.7, 2.0, -0.3],
    [0.1, 0.1, -1.0, 1.5],
    [0.4, -2.0, 0.9, 0.0],
    [2.2, 0.3, -0.7, -1.1],
]
HAND_LABELS = [0, 2, 3, 1, 3]
HAND_K = 3


def load_script(relpath):
    """The module of a repository script: ``tools/<x>.py`` imported as the package module
    ``tools.<x>``; ``datasets/<x>.py`` (e.g. ``datasets/prepare_lvis.py``) loaded as a fresh module.

    ``datasets/`` is not a package on purpose: a top-level package of that name would shadow (or be
    shadowed by) the ``datasets`` library.
    """
    folder, name = os.path.split(os.path.splitext(relpath)[0])
    if folder == "tools":
        return importlib.import_module(f"tools.{name}")
    if folder != "datasets":
        raise ValueError(f"not a tools/ or datasets/ script: {relpath}")
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tiny_dataset(out: str) -> dict:
    """Generate the tiny LVIS-format dataset in ``out``, registered as ``tiny_train`` /
    ``tiny_val`` (6 classes, 30 + 12 images of 64 px); returns the generator's paths."""
    paths = generate_synthetic_lvis(
        out, seed=0, num_classes=TINY_CLASSES, num_train_images=30, num_val_images=12, image_size=64
    )
    register_lvis_format("tiny_train", paths["train_json"], paths["image_root"])
    register_lvis_format("tiny_val", paths["val_json"], paths["image_root"])
    return paths


def tiny_opts(
    test: Sequence[str] = (),
    *,
    output_dir: Optional[str] = None,
    max_iter: Optional[int] = None,
    dets_per_image: Optional[int] = None,
    post_nms_topk_test: int = 64,
    lvis_format: Optional[dict] = None,
) -> List[str]:
    """KEY VALUE options shrinking a ``configs/LVIS`` config to the tiny dataset (64 px, 6
    classes, batch 2). ``test``: DATASETS.TEST names; ``lvis_format``: the tiny dataset's paths, to
    register it with DATASETS.LVIS_FORMAT (for child processes); others are set only when given."""
    opts = []
    if lvis_format is not None:
        triples = (
            ("tiny_train", lvis_format["train_json"], lvis_format["image_root"]),
            ("tiny_val", lvis_format["val_json"], lvis_format["image_root"]),
        )
        opts += ["DATASETS.LVIS_FORMAT", repr(triples)]
    opts += [
        "DATASETS.TRAIN", "('tiny_train',)",
        "DATASETS.TEST", repr(tuple(test)),
        "MODEL.ROI_HEADS.NUM_CLASSES", str(TINY_CLASSES),
        "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
        "MODEL.RPN.POST_NMS_TOPK_TEST", str(post_nms_topk_test),
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "SOLVER.IMS_PER_BATCH", "2",
    ]  # fmt: skip
    if dets_per_image is not None:
        opts += ["TEST.DETECTIONS_PER_IMAGE", str(dets_per_image)]
    if max_iter is not None:
        opts += ["SOLVER.MAX_ITER", str(max_iter), "SOLVER.WARMUP_ITERS", "0"]
    if output_dir is not None:
        opts += ["OUTPUT_DIR", output_dir]
    return opts


def tiny_cfg(config="synthetic/mask_rcnn_synth.yaml", output_dir="", opts=()):
    """``configs/LVIS/<config>`` shrunk further for tests (64 px, 6 classes, 3 iterations)."""
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, config))
    cfg.merge_from_list(tiny_opts(output_dir=output_dir, max_iter=3))
    cfg.merge_from_list(["SOLVER.CHECKPOINT_PERIOD", "100000"])
    cfg.merge_from_list(list(opts))
    return cfg


def rasterize(ann: dict, h: int, w: int):
    """The ``(h, w)`` bool mask of an LVIS annotation's polygons."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w))
    return mask_utils.decode(rle).astype(bool)


def ground_truth_as_results(val: dict, category_of=lambda c: c) -> List[dict]:
    """Every annotation of the LVIS-format dict ``val`` as a score-1 result (box and RLE mask),
    its category mapped through ``category_of``: a perfect detector, or one confusing classes."""
    from pycocotools import mask as mask_utils

    images = {im["id"]: im for im in val["images"]}
    dets = []
    for a in val["annotations"]:
        im = images[a["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], im["height"], im["width"]))
        rle["counts"] = rle["counts"].decode("ascii")
        dets.append(
            {
                "image_id": a["image_id"],
                "category_id": category_of(a["category_id"]),
                "bbox": a["bbox"],
                "segmentation": rle,
                "score": 1.0,
            }
        )
    return dets


def evaluate_lvis(gt, dets: List[dict], iou_type: str) -> dict:
    """The stock LVIS API's results (``AP``, ``APr``, ...) of ``dets`` against ``gt`` (LVIS)."""
    from lvis import LVISEval, LVISResults

    ev = LVISEval(gt, LVISResults(gt, dets), iou_type)
    ev.run()
    return ev.get_results()


def one_image_proposals(labels: List[int]):
    """Proposals of one 32 x 32 image: ``len(labels)`` copies of one box matched to a ground-truth
    box, with ``gt_classes`` = ``labels`` (for the box predictor's ``losses`` / ``predict_probs``).
    """
    # Imported here: detectron2.structures imports detectron2._C, which on v0.6 exists only once
    # disalign_det is imported (a test module may import this file first, e.g. in a spawned
    # process of torch.multiprocessing).
    from detectron2.structures import Boxes, Instances

    inst = Instances((32, 32))
    n = len(labels)
    inst.proposal_boxes = Boxes(torch.tensor([[1.0, 2.0, 20.0, 25.0]] * n))
    inst.gt_boxes = Boxes(torch.tensor([[2.0, 2.0, 21.0, 24.0]] * n))
    inst.gt_classes = torch.tensor(labels)
    return [inst]
