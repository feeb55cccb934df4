"""FRACAL, fractal calibration (Alexandridis et al., CVPR 2025), as pure functions.

A training-free test-time adjustment from two statistics of the training boxes, computed once:

* f_j, the image frequency of class j (the fraction of training images containing it), and
* D_j, the box-counting fractal dimension of the class's box centres in normalised image
  coordinates: N_g(j) is the number of cells of the g x g grid over [0, 1]^2 that contain at
  least one centre, and D_j is the least-squares slope of log N_g(j) against log g over the grids
  g = 1 .. G with g^2 <= n_j (n_j the class's number of boxes). Classes with fewer than 4 boxes,
  and slopes below 1, get D_j = 1.

With lambda the fractal exponent (2 in the paper), the frequency adjustment a_j = -log10(K f_j)
and the fractal adjustment b_j = -log10(K D_j^lambda / sum_k D_k^lambda):

* softmax classifier: p = softmax(z + [a, 0]) (background logit unchanged), then the K
  foreground probabilities are divided by D_j^lambda and all K + 1 renormalised;
* sigmoid classifier: p'_j = p_j sigmoid(z_j + a_j + b_j), p_j the stage one's probability;
  GOL's Gumbel classifier the same with G(z) = exp(-exp(-z)) for the sigmoid (their head applies
  the loss's own activation to both factors).

What is implemented is read from the authors' public code (kostas1515/FRACAL, ``base10`` variant,
the default), since the paper's text was not available to us: the base-10 logarithms, the image
(not instance) frequencies, the uniform reference 1/K and the sigmoid form come from there.
"""

import logging

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "box_counting_dimensions",
    "fracal_adjustments",
    "fracal_sigmoid_probs",
    "fracal_softmax_probs",
    "fracal_statistics_from_datasets",
    "fracal_statistics_from_dicts",
]

logger = logging.getLogger(__name__)


def box_counting_dimensions(centres, classes, num_classes: int, grid: int = 64) -> torch.Tensor:
    """(K,) box-counting dimensions D_j of the centres of each class.

    Args:
        centres: (N, 2) box centres, normalised to [0, 1] by the image width and height (values
            outside are clamped; 1.0 falls in the last cell).
        classes: (N,) int64 contiguous class ids in [0, K).
        num_classes: K.
        grid: G, the largest grid.
    """
    centres = torch.as_tensor(centres, dtype=torch.float64).reshape(-1, 2).clamp(0, 1)
    classes = torch.as_tensor(classes, dtype=torch.int64).flatten()
    n = torch.bincount(classes, minlength=num_classes).double()
    sizes = torch.arange(1, grid + 1, dtype=torch.float64)
    counts = torch.zeros(grid, num_classes, dtype=torch.float64)
    for k, g in enumerate(range(1, grid + 1)):
        cell = (centres * g).floor().clamp(max=g - 1).long()
        key = (classes * g + cell[:, 1]) * g + cell[:, 0]
        occupied = torch.unique(key) // (g * g)
        counts[k] = torch.bincount(occupied, minlength=num_classes).double()
    x = sizes.log()[:, None].expand(grid, num_classes)
    y = counts.clamp(min=1).log()
    use = (sizes[:, None] ** 2 <= n[None, :]).double()  # grids with at most n_j cells
    m = use.sum(0).clamp(min=1)
    mx, my = (use * x).sum(0) / m, (use * y).sum(0) / m
    var = (use * (x - mx) ** 2).sum(0)
    slope = (use * (x - mx) * (y - my)).sum(0) / var.clamp(min=1e-12)
    dims = torch.where((n >= 4) & (var > 0), slope, torch.ones_like(slope)).clamp(min=1.0)
    return dims.float()


def fracal_statistics_from_dicts(dataset_dicts, num_classes: int, grid: int = 64):
    """(image frequencies f (K,), fractal dimensions D (K,)) from detectron2 dataset dicts
    (``width``, ``height``, ``annotations`` with ``bbox``, ``bbox_mode``, contiguous
    ``category_id``). A class in no image gets the frequency of one image."""
    from detectron2.structures import BoxMode

    centres, classes = [], []
    images_with = np.zeros(num_classes)
    for d in dataset_dicts:
        anns = d.get("annotations") or []
        if not anns:
            continue
        w, h = float(d["width"]), float(d["height"])
        for a in anns:
            x0, y0, x1, y1 = BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
            centres.append(((x0 + x1) / (2 * w), (y0 + y1) / (2 * h)))
            classes.append(a["category_id"])
        images_with[np.unique([a["category_id"] for a in anns])] += 1
    if not classes:
        raise ValueError("FRACAL: the training data has no boxes")
    freq = np.maximum(images_with, 1) / len(dataset_dicts)
    dims = box_counting_dimensions(np.asarray(centres), np.asarray(classes), num_classes, grid)
    return torch.as_tensor(freq, dtype=torch.float32), dims


def fracal_statistics_from_datasets(dataset_names, num_classes: int, grid: int = 64):
    """:func:`fracal_statistics_from_dicts` of the registered detectron2 datasets
    ``dataset_names`` (the training sets, ``DATASETS.TRAIN``), all their images together."""
    from detectron2.data import DatasetCatalog

    if not dataset_names:
        raise ValueError(
            "MODEL.DISALIGN.POSTHOC='fracal' needs the training boxes: the model has no FRACAL "
            "statistics (roi_heads.box_predictor.fracal_freq / fracal_dims) and DATASETS.TRAIN "
            "is empty"
        )
    dicts = [d for name in dataset_names for d in DatasetCatalog.get(name)]
    logger.info("FRACAL: statistics of %d training images of %s", len(dicts), list(dataset_names))
    return fracal_statistics_from_dicts(dicts, num_classes, grid)


def fracal_adjustments(freq, dims, lam: float):
    """(K,) a_j = -log10(K f_j) and b_j = -log10(K D_j^lambda / sum_k D_k^lambda)."""
    num_classes = freq.numel()
    a = -torch.log10(num_classes * freq)
    d = dims.pow(lam)
    b = -torch.log10(num_classes * d / d.sum())
    return a, b


def fracal_softmax_probs(logits, freq, dims, lam: float):
    """(R, K + 1) logits -> (R, K + 1) FRACAL probabilities of a softmax classifier."""
    a, _ = fracal_adjustments(freq.to(logits), dims.to(logits), lam)
    p = F.softmax(logits + torch.cat([a, a.new_zeros(1)])[None, :], dim=1)
    p = torch.cat([p[:, :-1] / dims.to(logits).pow(lam)[None, :], p[:, -1:]], dim=1)
    return p / p.sum(dim=1, keepdim=True)


def fracal_sigmoid_probs(probs, logits, freq, dims, lam: float, activation=torch.sigmoid):
    """(R, K + 1) stage-one probabilities and logits of a sigmoid classifier -> (R, K + 1)
    FRACAL probabilities p_j act(z_j + a_j + b_j) (the background column unchanged);
    ``activation`` is the classifier's per-class activation (GOL's Gumbel for a GOL stage one)."""
    a, b = fracal_adjustments(freq.to(logits), dims.to(logits), lam)
    fg = probs[:, :-1] * activation(logits[:, :-1] + (a + b)[None, :])
    return torch.cat([fg, probs[:, -1:]], dim=1)
