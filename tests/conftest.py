"""Shared test setup.

``disalign_det`` is imported first: its compatibility shims must be in place before any detectron2
module that needs them is imported by a test module.
"""

import disalign_det  # noqa: F401  isort:skip

import importlib.util
import os

import pytest
import torch
from detectron2.config import get_cfg

from disalign_det import add_disalign_config
from disalign_det.data import generate_synthetic_lvis, register_lvis_format

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "LVIS")
TINY_CLASSES = 6

torch.set_num_threads(2)


def load_script(relpath):
    """Import a script of the repo (``tools/train_net.py``, ``datasets/prepare_lvis.py``: their
    folders are not packages) as a fresh module."""
    name = os.path.splitext(os.path.basename(relpath))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A tiny generated LVIS-format dataset registered as ``tiny_train`` / ``tiny_val``."""
    out = str(tmp_path_factory.mktemp("tiny_lvis"))
    paths = generate_synthetic_lvis(
        out, seed=0, num_classes=TINY_CLASSES, num_train_images=30, num_val_images=12, image_size=64
    )
    register_lvis_format("tiny_train", paths["train_json"], paths["image_root"])
    register_lvis_format("tiny_val", paths["val_json"], paths["image_root"])
    return paths


def tiny_cfg(config="synthetic/mask_rcnn_synth.yaml", output_dir="", opts=()):
    """``configs/LVIS/<config>`` shrunk further for tests (64 px, 6 classes)."""
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, config))
    cfg.merge_from_list(
        [
            "DATASETS.TRAIN",
            "('tiny_train',)",
            "DATASETS.TEST",
            "()",
            "MODEL.ROI_HEADS.NUM_CLASSES",
            str(TINY_CLASSES),
            "INPUT.MIN_SIZE_TRAIN",
            "(64,)",
            "INPUT.MAX_SIZE_TRAIN",
            "64",
            "INPUT.MIN_SIZE_TEST",
            "64",
            "INPUT.MAX_SIZE_TEST",
            "64",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN",
            "64",
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            "64",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            "32",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "SOLVER.MAX_ITER",
            "3",
            "SOLVER.WARMUP_ITERS",
            "0",
            "SOLVER.CHECKPOINT_PERIOD",
            "100000",
            "OUTPUT_DIR",
            output_dir,
        ]
    )
    cfg.merge_from_list(list(opts))
    return cfg
