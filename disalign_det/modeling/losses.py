"""Loss maths of DisAlign as pure functions (no module state, no config).

Generalized re-weighting (GRW, Sec. 3.3 of the paper): for K foreground classes with training
frequencies n_j,

    r_j = n_j / sum_k n_k,     w_j ∝ (1 / r_j) ** rho,   scaled so that sum_{j<K} w_j = K,

and the background (the LAST logit, as in detectron2) gets weight 1. The classification loss is the
softmax cross-entropy weighted by w of each sample's label, normalised by the sum of the sample
weights (PyTorch's weighted-mean semantics). With detectron2's sigmoid classifier (and its federated
loss), each RoI's K binary terms are weighted by the weight of the RoI's label, again a weighted
mean over RoIs.

Every weighted mean takes an optional ``normalize``: a function of the local sum of weights (a
0-dim tensor) returning the denominator to use. With several processes it is
:func:`global_normalizer`, so that the mean runs over the global batch; None (one process) keeps
the local computation exactly as it was.

Every loss is computed and returned in float32, whatever the dtype of the logits (fp16/bf16
under autocast): the weights, the per-RoI terms and their sums keep float32's range and
precision (a sum over R x K sigmoid terms overflows fp16's 65504), and the cast of a half logit
to float32 is exact.
"""

import contextlib
import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .calibration import _autocast_available
from .cpu_kernel import upsampled_ce_grad
from .upsample_adjoint import bilinear_upsample_adjoint

__all__ = [
    "check_rho",
    "global_normalizer",
    "grw_class_weights",
    "upsampled_cross_entropy",
    "weighted_cross_entropy",
    "weighted_mask_bce",
    "weighted_sigmoid_cross_entropy",
]

logger = logging.getLogger(__name__)


def check_rho(rho) -> float:
    """``rho`` as a float; ValueError naming ``MODEL.DISALIGN.RHO`` unless it is finite and >= 0."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho):
        raise ValueError(f"MODEL.DISALIGN.RHO must be a finite number >= 0, got {rho!r}")
    if rho < 0:
        raise ValueError(f"MODEL.DISALIGN.RHO must be >= 0, got {rho}")
    return float(rho)


def grw_class_weights(counts, rho: float) -> torch.Tensor:
    """Generalized re-weighting class weights.

    Args:
        counts: (K,) per-class training frequencies n_j (sequence or tensor, non-negative).
        rho (float): the exponent rho >= 0. rho = 0 gives all-ones weights (plain cross-entropy).

    Returns:
        Tensor: (K + 1,) float32 weights; the first K (foreground) sum to K, the last (background)
        is 1.

    A class with zero samples would get an infinite weight; its count is clamped to the smallest
    positive count (or 1) with a warning instead.
    """
    rho = check_rho(rho)
    n = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if n.numel() == 0:
        raise ValueError("grw_class_weights needs at least one class count")
    if not torch.isfinite(n).all() or (n < 0).any():
        raise ValueError(f"class counts must be finite and >= 0, got {n.tolist()}")
    zero = n == 0
    if zero.any():
        floor = n[~zero].min().item() if (~zero).any() else 1.0
        logger.warning(
            "GRW: %d class(es) have zero training samples (contiguous ids %s); their count is "
            "clamped to %g so that their weight stays finite.",
            int(zero.sum()),
            zero.nonzero().flatten().tolist()[:20],
            floor,
        )
        n = torch.where(zero, torch.full_like(n, floor), n)
    r = n / n.sum()
    w = r.pow(-float(rho))
    w = w * (w.numel() / w.sum())
    return torch.cat([w, w.new_ones(1)]).to(torch.float32)


def global_normalizer(local_weight_sum: torch.Tensor) -> torch.Tensor:
    """Denominator of a weighted mean over the global batch, for ``normalize``.

    Each process returns ``sum_local(w l) / (sum_all(w) / world_size)``; DDP averages the
    gradients over the processes, so the gradient is that of ``sum_all(w l) / sum_all(w)``, the
    loss of one process holding the whole batch. The all-reduce is of the detached weight sum
    (weights are constants); every process must call it, with a zero sum if it has no sample.
    """
    total = local_weight_sum.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def _empty(x, normalize):
    # 0 connected to ``x`` (keeps the graph alive), after taking part in the all-reduce.
    if normalize is not None:
        normalize(x.new_zeros((), dtype=torch.float32))
    return x.float().sum() * 0.0


def weighted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, weights=None, normalize=None, ignore_index=-100
):
    """Softmax cross-entropy weighted per class, weighted-mean reduction.

    Args:
        logits: (R, K + 1) class logits, or (N, C, H, W) per-pixel logits (semantic segmentation).
        labels: (R,) int64 labels in [0, K] (K = background), or (N, H, W) labels in [0, C) or
            ``ignore_index``.
        weights: (K + 1,) (or (C,)) class weights, or None for plain cross-entropy.
        normalize: see the module docstring (None: the local weighted mean).
        ignore_index: label whose samples count neither in the loss nor in the denominator.

    Returns:
        Scalar tensor: sum_i w[y_i] CE_i / sum_i w[y_i] over the samples not ignored; 0
        (connected to ``logits``) when there is none.
    """
    valid = labels != ignore_index
    if labels.numel() == 0 or (ignore_index >= 0 and not bool(valid.any())):
        # F.cross_entropy gives NaN (0 / 0) for an empty batch; keep the graph alive instead.
        return _empty(logits, normalize)
    logits = logits.float()  # fp32 under autocast too (see the module docstring)
    if weights is not None:
        weights = weights.to(dtype=logits.dtype, device=logits.device)
    if normalize is None:
        return F.cross_entropy(
            logits, labels, weight=weights, reduction="mean", ignore_index=ignore_index
        )
    # reduction="none" with weights gives w[y_i] CE_i (0 where ignored).
    per_roi = F.cross_entropy(
        logits, labels, weight=weights, reduction="none", ignore_index=ignore_index
    )
    kept = labels[valid]
    local = weights[kept].sum() if weights is not None else logits.new_tensor(kept.numel())
    return per_roi.sum() / normalize(local)


def upsampled_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scale_factor: int,
    weights=None,
    normalize=None,
    ignore_index=-100,
):
    """:func:`weighted_cross_entropy` of the logits upsampled bilinearly by ``scale_factor``
    (``F.interpolate(..., mode="bilinear", align_corners=False)``, what detectron2's segmentation
    heads do before their per-pixel loss), computed pixel-major and with a hand-written backward.

    Args:
        logits: (N, C, h, w) per-pixel logits at the head's stride.
        labels: (N, H, W) int64 labels in [0, C) or ``ignore_index``, H = h * scale_factor and
            W = w * scale_factor.
        scale_factor: the upsampling factor (the head's ``common_stride``).
        weights, normalize, ignore_index: as in :func:`weighted_cross_entropy`.

    Returns:
        Scalar float32 tensor: ``sum_p w[y_p] CE_p / sum_p w[y_p]`` over the non-ignored pixels p
        of the upsampled logits u (or ``normalize``'s denominator), the value of
        ``weighted_cross_entropy(F.interpolate(logits, ...), labels, ...)`` up to float rounding.

    Why not autograd through ``F.interpolate`` and ``F.cross_entropy``: their CPU backwards on
    (N, C, H, W) are slow (``upsample_bilinear2d_backward`` scatters, the softmax's reduces over C
    at stride H * W) and write two fresh full-resolution tensors. Here the logits are upsampled
    channels-last (u: (N, H, W, C), softmax over contiguous rows), the forward keeps P = softmax(u)
    and takes CE_p = -log P_{y_p}(p) (log_softmax(u(p))_y where P_y underflows to < 1e-30). The
    gradient with respect to u,

        dL/du_c(p) = w[y_p] (P_c(p) - [c = y_p]) / sum_q w[y_q]   (0 where ignored),

    is written in place into P, and the gradient with respect to ``logits`` is the adjoint
    (transpose) of the separable bilinear upsampling applied to it
    (:func:`bilinear_upsample_adjoint`). On the CPU the C++ kernel of :mod:`.cpu_kernel` does both
    in one pass over P where it is built. The same numbers as autograd's up to float rounding.
    """
    logits = logits.float()  # fp32 under autocast too (see the module docstring)
    valid = labels != ignore_index
    if labels.numel() == 0 or (ignore_index >= 0 and not bool(valid.any())):
        return _empty(logits, normalize)
    if weights is not None:
        weights = weights.to(dtype=logits.dtype, device=logits.device)
    with _autocast_off(logits.device.type):  # float32 throughout (also a dense adjoint's matmul)
        if not (torch.is_grad_enabled() and logits.requires_grad):
            return _upsampled_ce_forward(logits, labels, valid, weights, scale_factor, normalize)[0]
        return _UpsampledCrossEntropy.apply(logits, labels, valid, weights, scale_factor, normalize)


def _autocast_off(device_type):
    if not _autocast_available(device_type):  # e.g. "meta": no autocast to turn off
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def _upsampled_softmax(logits, scale_factor):
    """(u, P): the logits upsampled channels-last as an (N, H, W, C) tensor and its softmax over
    C (contiguous rows)."""
    z = logits.contiguous(memory_format=torch.channels_last)
    up = F.interpolate(z, scale_factor=scale_factor, mode="bilinear", align_corners=False)
    u = up.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C); a view when up is channels-last
    return u, torch.softmax(u, dim=-1)


def _upsampled_ce_forward(logits, labels, valid, weights, scale_factor, normalize):
    """(loss, P (N, H, W, C) softmax of the upsampled logits, (N, H, W) labels with the ignored
    pixels' set to 0, (N, H, W) flat indices of P_{y_p}(p) in P (ignored pixels: of class 0),
    P_{y_p}(p) (N, H, W), per-pixel gradient scale w[y_p] / denominator (N, H, W), 0 where
    ignored)."""
    num_classes = logits.shape[1]
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    if bool(((safe < 0) | (safe >= num_classes)).any()):
        raise ValueError(
            f"labels must be in [0, {num_classes}) or the ignore value, got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    u, prob = _upsampled_softmax(logits, scale_factor)
    if u.shape[:3] != labels.shape:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match the logits upsampled by "
            f"{scale_factor}: {tuple(u.shape[:3])}"
        )
    # Flat index of (p, y_p) in prob: index_select / index_add_ on it are faster than gather /
    # scatter_add_ along the last dim.
    flat = torch.arange(0, prob.numel(), num_classes, device=safe.device).view(safe.shape) + safe
    p_y = prob.view(-1).index_select(0, flat.view(-1)).view(safe.shape)
    nll = -torch.log(p_y)
    tiny = (p_y < 1e-30) & valid
    if bool(tiny.any()):  # P_y underflowed: the log-softmax of those pixels' logits
        nll[tiny] = -torch.log_softmax(u[tiny], dim=-1).gather(-1, safe[tiny].unsqueeze(-1))[:, 0]
    del u
    nll = nll.masked_fill(~valid, 0.0)  # ignored pixels (their P_0 may underflow: inf * 0)
    # The weight sum as weighted_cross_entropy takes it.
    kept = labels[valid]
    local = weights[kept].sum() if weights is not None else prob.new_tensor(kept.numel())
    denominator = local if normalize is None else normalize(local)
    pixel_w = weights[safe] * valid if weights is not None else valid.to(prob.dtype)
    loss = (pixel_w * nll).sum() / denominator
    return loss, prob, safe, flat, p_y, pixel_w / denominator


class _UpsampledCrossEntropy(torch.autograd.Function):
    """See :func:`upsampled_cross_entropy`."""

    @staticmethod
    def forward(ctx, logits, labels, valid, weights, scale_factor, normalize):
        loss, prob, safe, flat, p_y, grad_scale = _upsampled_ce_forward(
            logits, labels, valid, weights, scale_factor, normalize
        )
        ctx.prob = prob  # consumed (overwritten) by the backward
        ctx.scale_factor = scale_factor
        ctx.save_for_backward(logits, safe, flat, p_y, grad_scale)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, safe, flat, p_y, grad_scale = ctx.saved_tensors
        prob, ctx.prob = ctx.prob, None
        with _autocast_off(logits.device.type):
            if prob is None:  # a second backward (retain_graph=True): the first released it
                prob = _upsampled_softmax(logits, ctx.scale_factor)[1]
            g = grad_scale * grad_loss  # (N, H, W)
            grad = upsampled_ce_grad(  # the CPU kernel (None where it does not apply)
                prob, safe, g, logits.shape[-2:], ctx.scale_factor
            )
            if grad is None:  # (P - onehot) * w[y_p] / denominator in P's buffer, its adjoint
                prob.view(-1).index_copy_(0, flat.view(-1), p_y.view(-1) - 1.0)
                grad = bilinear_upsample_adjoint(
                    prob,
                    logits.shape[-2:],
                    ctx.scale_factor,
                    dims=(1, 2),
                    row_scale=g.unsqueeze(-1),
                    overwrite=True,
                )
                # (N, h, w, C) -> (N, C, h, w) laid out as the logits, for the calibration.
                grad = grad.permute(0, 3, 1, 2).contiguous()
        return grad, None, None, None, None, None


def weighted_sigmoid_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, weights=None, class_mask=None, normalize=None
):
    """Sigmoid cross-entropy of detectron2's sigmoid classifier (``USE_SIGMOID_CE``; with
    ``class_mask`` its federated loss), each RoI weighted by the class weight of its label.

    Args:
        logits: (R, K + 1) class logits; the (K + 1)-th column exists for the layout only and is
            ignored (no competing background logit: a background RoI has K negative targets).
        labels: (R,) int64 labels in [0, K] (K = background).
        weights: (K + 1,) class weights (GRW, background last), or None.
        class_mask: (K,) 0/1 float, the federated loss's classes (the RoIs' labels plus sampled
            negatives), or None for all K classes.
        normalize: see the module docstring (None: the local weighted mean).

    Returns:
        Scalar tensor ``sum_i w[y_i] sum_{j<K} m_j BCE(z_ij, [y_i = j]) / sum_i w[y_i]``; with
        ``weights=None`` the same divided by R, exactly detectron2's loss (also for all-ones
        weights: multiplying by 1 and summing R ones are exact). 0 (connected to ``logits``) when
        R == 0.
    """
    if labels.numel() == 0:
        return _empty(logits, normalize)
    logits = logits.float()  # fp32 under autocast too (see the module docstring)
    num_rois, num_classes = logits.shape[0], logits.shape[1] - 1
    target = logits.new_zeros(num_rois, num_classes + 1)
    target[range(num_rois), labels] = 1
    loss = F.binary_cross_entropy_with_logits(
        logits[:, :-1], target[:, :num_classes], reduction="none"
    )
    if class_mask is not None:
        loss = loss * class_mask.view(1, num_classes).expand(num_rois, num_classes).float()
    if weights is None:
        if normalize is None:
            return loss.sum() / num_rois
        return loss.sum() / normalize(logits.new_tensor(num_rois))
    roi_weights = weights.to(dtype=logits.dtype, device=logits.device)[labels]
    local = roi_weights.sum()
    return (loss * roi_weights[:, None]).sum() / (local if normalize is None else normalize(local))


def weighted_mask_bce(
    mask_logits: torch.Tensor, gt_masks: torch.Tensor, roi_weights=None, normalize=None
):
    """Per-pixel binary cross-entropy of mask logits, averaged per RoI, then a weighted mean.

    Args:
        mask_logits: (R, M, M) logits of each RoI's ground-truth class channel.
        gt_masks: (R, M, M) targets in [0, 1].
        roi_weights: (R,) weight of each RoI (GRW weight of its ground-truth class), or None for
            the stock Mask R-CNN loss (mean over all pixels of all RoIs).
        normalize: see the module docstring (None: the local weighted mean).

    Returns:
        Scalar tensor; 0 (connected to ``mask_logits``) when R == 0.
    """
    if mask_logits.shape[0] == 0:
        return _empty(mask_logits, normalize)
    mask_logits = mask_logits.float()  # fp32 under autocast too (see the module docstring)
    gt_masks = gt_masks.to(dtype=mask_logits.dtype)
    if roi_weights is None:
        if normalize is None:
            return F.binary_cross_entropy_with_logits(mask_logits, gt_masks, reduction="mean")
        loss = F.binary_cross_entropy_with_logits(mask_logits, gt_masks, reduction="sum")
        return loss / normalize(mask_logits.new_tensor(mask_logits.numel()))
    per_roi = F.binary_cross_entropy_with_logits(mask_logits, gt_masks, reduction="none")
    per_roi = per_roi.flatten(1).mean(dim=1)
    roi_weights = roi_weights.to(dtype=mask_logits.dtype, device=mask_logits.device)
    local = roi_weights.sum()
    denominator = local if normalize is None else normalize(local)
    return (per_roi * roi_weights).sum() / denominator.clamp(min=1e-12)
