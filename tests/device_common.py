"""Helpers of the device tests: ``tests/test_device.py`` (autocast on CPU) and ``tests/test_gpu.py``
(the ``gpu`` tier): a dataset written with Pillow only, the stage-one / stage-two model pair of each
classifier on a device, input batches and detection matching.

The dataset here needs neither OpenCV nor the synthetic generator (which draws with OpenCV): the
prepared GPU run (``scripts/gpu_check.sh``) has no room for OpenCV's 50 MB wheel, see docs/gpu.md.
"""

import json
import os

import numpy as np
import pytest
import torch
from common import TINY_CLASSES, tiny_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage
from PIL import Image

from disalign_det.compat import features
from disalign_det.data import register_lvis_format
from disalign_det.engine import Trainer
from disalign_det.modeling import install_class_weights, is_calibration_parameter

__all__ = [
    "AMP",
    "move_calibration",
    "outputs_with_hook",
    "train_step",
    "CLASSIFIERS",
    "classifier_params",
    "device_batch",
    "model_pair",
    "on_device",
    "rect_dataset",
    "same_detections",
]

AMP = dict(device_type="cpu", dtype=torch.bfloat16)  # autocast on the CPU
TRAIN, VAL = "device_rects_train", "device_rects_val"

_SIGMOID = ["MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "True"]
_FED = _SIGMOID + [
    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS", "True", "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES", "3",
]  # fmt: skip

# classifier: (stage-one config, stage-two config, options of both)
CLASSIFIERS = {
    "softmax": ("synthetic/mask_rcnn_synth.yaml", "synthetic/disalign_synth.yaml", []),
    "cosine": (
        "synthetic/mask_rcnn_synth_cosine.yaml",
        "synthetic/disalign_synth_cosine.yaml",
        [],
    ),
    "sigmoid": ("synthetic/mask_rcnn_synth.yaml", "synthetic/disalign_synth.yaml", _SIGMOID),
    "federated": ("synthetic/mask_rcnn_synth.yaml", "synthetic/disalign_synth.yaml", _FED),
}


def classifier_params(*names, marks=()):
    """``pytest.param`` per classifier; the sigmoid ones skip on detectron2 v0.6 (it has none)."""
    no_sigmoid = pytest.mark.skipif(
        not features.has_federated_loss(),
        reason="this detectron2 (v0.6) has no sigmoid classifier / federated loss",
    )
    names = names or tuple(CLASSIFIERS)
    return [
        pytest.param(n, marks=[*marks, *([no_sigmoid] if n in ("sigmoid", "federated") else [])])
        for n in names
    ]


def rect_dataset(out, seed=0, num_train=8, num_val=4, size=64):
    """An LVIS-format dataset of ``TINY_CLASSES`` classes, registered as ``TRAIN`` / ``VAL``:
    ``size`` px PNG images with 1-3 filled rectangles, one colour per class (long-tailed class
    draw), polygon masks = the rectangles. Categories carry the training image/instance counts
    (as LVIS's jsons do; the federated loss and GRW read them). Returns (train json, val json)."""
    if _REGISTERED:  # once per process (the catalog refuses a second registration)
        return _REGISTERED[0]
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 255, size=(TINY_CLASSES, 3))
    probs = 0.5 ** np.arange(TINY_CLASSES)
    probs /= probs.sum()
    splits = {}
    image_id = ann_id = 0
    for split, num in (("train", num_train), ("val", num_val)):
        os.makedirs(os.path.join(out, f"{split}2017"), exist_ok=True)
        images, anns = [], []
        for _ in range(num):
            image_id += 1
            img = rng.integers(0, 30, size=(size, size, 3)).astype(np.uint8)
            for _ in range(int(rng.integers(1, 4))):
                cls = int(rng.choice(TINY_CLASSES, p=probs))
                w, h = rng.integers(size // 6, size // 2, size=2)
                x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
                img[y0 : y0 + h, x0 : x0 + w] = colours[cls]
                ann_id += 1
                x1, y1 = float(x0 + w), float(y0 + h)
                anns.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": cls + 1,
                        "bbox": [float(x0), float(y0), float(w), float(h)],
                        "area": float(w * h),
                        "segmentation": [
                            [float(x0), float(y0), x1, float(y0), x1, y1, float(x0), y1]
                        ],
                    }
                )
            name = f"{split}2017/{image_id:012d}.png"  # (LVIS: folder/file from coco_url)
            Image.fromarray(img).save(os.path.join(out, name))
            images.append(
                {"id": image_id, "width": size, "height": size, "file_name": name,
                 "coco_url": f"http://rects.invalid/{name}", "neg_category_ids": [],
                 "not_exhaustive_category_ids": []}  # fmt: skip
            )
        splits[split] = (images, anns)
    train_anns = splits["train"][1]
    categories = []
    for k in range(TINY_CLASSES):
        inst = [a for a in train_anns if a["category_id"] == k + 1]
        n_img = len({a["image_id"] for a in inst})
        categories.append(
            {"id": k + 1, "name": f"rect_{k + 1}", "synonyms": [f"rect_{k + 1}"],
             "frequency": "f" if n_img > 10 else ("c" if n_img > 1 else "r"),
             "image_count": max(n_img, 1), "instance_count": max(len(inst), 1)}  # fmt: skip
        )
    paths = []
    for split, name in (("train", TRAIN), ("val", VAL)):
        images, anns = splits[split]
        path = os.path.join(out, f"rects_{split}.json")
        with open(path, "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": categories}, f)
        register_lvis_format(name, path, out)
        paths.append(path)
    _REGISTERED.append(tuple(paths))
    return _REGISTERED[0]


_REGISTERED = []


def _cfg(config, classifier, device, extra=()):
    opts = CLASSIFIERS[classifier][2] + [
        "DATASETS.TRAIN", f"('{TRAIN}',)", "DATASETS.TEST", f"('{VAL}',)",
        "MODEL.DEVICE", device, *extra,
    ]  # fmt: skip
    return tiny_cfg(config, opts=opts)


def model_pair(classifier, device, extra=()):
    """(cfg1, stage-one model, cfg2, stage-two model at init) on ``device``: the stage one with
    a random (seed 0) but decisive classifier, the stage two built from its weights (only the
    calibration missing), frozen but the calibration, GRW weights installed."""
    stage1, stage2, _ = CLASSIFIERS[classifier]
    cfg1 = _cfg(stage1, classifier, device, extra)
    cfg2 = _cfg(stage2, classifier, device, extra)
    torch.manual_seed(0)
    m1 = build_model(cfg1)
    with torch.no_grad():
        head = m1.roi_heads
        # Spread class scores (a random head scores every class alike: ties everywhere).
        head.box_predictor.cls_score.weight.normal_(std=0.05 if classifier == "cosine" else 0.3)
        if getattr(head.box_predictor.cls_score, "bias", None) is not None:
            head.box_predictor.cls_score.bias[-1] = -2.0  # fewer background wins
        head.mask_head.predictor.weight.normal_(std=0.1)
        for name, v in m1.named_parameters():
            # Zero box regressions: proposals and detections stay inside the image.
            if "anchor_deltas" in name or "bbox_pred" in name:
                v.zero_()
    m2 = Trainer.build_model(cfg2)
    install_class_weights(m2, cfg2)
    missing, unexpected = m2.load_state_dict(m1.state_dict(), strict=False)
    assert not unexpected and all(is_calibration_parameter(k) for k in missing), missing
    return cfg1, m1, cfg2, m2


def device_batch(cfg, train, num=2):
    """``num`` mapped records of the train (with instances) or val split, on the CPU (the model
    moves them to its device, as in a real run)."""
    mapper = DatasetMapper(cfg, is_train=train)
    seed_all_rng(0)  # the training mapper's random flips: the same batch in every run
    return [mapper(d) for d in DatasetCatalog.get(TRAIN if train else VAL)[:num]]


def _key(inst, i):
    return (int(inst.pred_classes[i]), tuple(inst.pred_boxes.tensor[i].tolist()))


def same_detections(out1, out2, score_rtol=0.0, min_common=1.0, min_mask_agree=1.0):
    """Assert that two lists of ``{"instances": ...}`` hold the same detections: matched by class
    and box (exact), at least ``min_common`` of each image's detections in both, their scores
    within ``score_rtol`` * score, their pasted masks agreeing on ``min_mask_agree`` of the pixels.
    Returns the number of matched detections."""
    total = 0
    for a, b in zip(out1, out2):
        a, b = a["instances"].to("cpu"), b["instances"].to("cpu")
        ka, kb = {_key(a, i): i for i in range(len(a))}, {_key(b, i): i for i in range(len(b))}
        common = sorted(set(ka) & set(kb))
        total += len(common)
        assert len(common) >= min_common * max(len(a), len(b)), (len(common), len(a), len(b))
        ia = torch.tensor([ka[k] for k in common], dtype=torch.long)
        ib = torch.tensor([kb[k] for k in common], dtype=torch.long)
        s1, s2 = a.scores[ia].double(), b.scores[ib].double()
        assert ((s1 - s2).abs() <= score_rtol * s2 + 1e-7).all(), ((s1 - s2).abs() / s2).max()
        agree = (a.pred_masks[ia] == b.pred_masks[ib]).flatten(1).double().mean(1)
        assert len(agree) == 0 or agree.min() >= min_mask_agree, agree.min()
    return total


def on_device(model, device):
    """Names of the parameters and buffers of ``model`` that are NOT on ``device``."""
    dev = torch.device(device)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [n for n, t in tensors if t.device.type != dev.type]


def move_calibration(model, seed=1):
    """beta, gamma and the confidence layers off their identity start (a stage two under way)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name or "logit_bias" in name or "confidence_layer" in name:
                p.add_(torch.randn(p.shape, generator=g).to(p) * 0.3)


def outputs_with_hook(model, batch, hook_module, amp=AMP):
    """(detections, raw outputs of ``hook_module``) of an eval forward under autocast ``amp``."""
    seen = []
    handle = hook_module.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad(), torch.autocast(**amp):
            out = model(batch)
    finally:
        handle.remove()
    return out, seen[0]


def train_step(model, batch, amp, autocast=AMP):
    """Losses and calibration gradients of one stage-two training step (seeded RoI sampling)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with EventStorage(), torch.autocast(**autocast, enabled=amp):
        losses = model(batch)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, grads
