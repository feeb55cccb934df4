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
import functools
import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .calibration import _autocast_available

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
    (:func:`bilinear_upsample_adjoint`). The same numbers as autograd's up to float rounding.
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
    """(loss, P (N, H, W, C) softmax of the upsampled logits, (N, H, W) flat indices of
    P_{y_p}(p) in P (ignored pixels: of class 0), P_{y_p}(p) (N, H, W), per-pixel gradient scale
    w[y_p] / denominator (N, H, W), 0 where ignored)."""
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
    return loss, prob, flat, p_y, pixel_w / denominator


class _UpsampledCrossEntropy(torch.autograd.Function):
    """See :func:`upsampled_cross_entropy`."""

    @staticmethod
    def forward(ctx, logits, labels, valid, weights, scale_factor, normalize):
        loss, prob, flat, p_y, grad_scale = _upsampled_ce_forward(
            logits, labels, valid, weights, scale_factor, normalize
        )
        ctx.prob = prob  # consumed (overwritten) by the backward
        ctx.scale_factor = scale_factor
        ctx.save_for_backward(logits, flat, p_y, grad_scale)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, flat, p_y, grad_scale = ctx.saved_tensors
        prob, ctx.prob = ctx.prob, None
        with _autocast_off(logits.device.type):
            if prob is None:  # a second backward (retain_graph=True): the first overwrote it
                prob = _upsampled_softmax(logits, ctx.scale_factor)[1]
            # (P - onehot) * w[y_p] / denominator in P's buffer, then its adjoint.
            prob.view(-1).index_copy_(0, flat.view(-1), p_y.view(-1) - 1.0)
            g = (grad_scale * grad_loss).unsqueeze(-1)  # (N, H, W, 1)
            grad = bilinear_upsample_adjoint(
                prob, logits.shape[-2:], ctx.scale_factor, dims=(1, 2), row_scale=g, overwrite=True
            )
        # (N, h, w, C) -> (N, C, h, w) laid out as the logits, for the calibration's backward.
        return grad.permute(0, 3, 1, 2).contiguous(), None, None, None, None, None


def bilinear_upsample_adjoint(
    grad: torch.Tensor, size, scale_factor, dims=(2, 3), row_scale=None, overwrite=False
) -> torch.Tensor:
    """Gradient with respect to x of ``F.interpolate(x, scale_factor=scale_factor,
    mode="bilinear", align_corners=False)`` given ``grad`` of its output.

    Args:
        grad: gradient of the upsampled tensor, (N, C, H, W) (``dims=(2, 3)``) or any layout
            with the two spatial axes at ``dims``, e.g. (N, H, W, C) with ``dims=(1, 2)``.
        size: (h, w) of x, with H = floor(h * scale_factor), W = floor(w * scale_factor).
        scale_factor: the factor given to ``F.interpolate``.
        row_scale: None, or a tensor broadcastable to ``grad``: the adjoint of ``grad *
            row_scale`` is returned.
        overwrite: ``grad`` may be overwritten (with ``grad * row_scale``), which saves a
            full-resolution allocation.

    Returns:
        ``grad``'s layout with (h, w) at ``dims``.

    Bilinear upsampling is separable, U x = A_H x A_W^T with A_H (H, h) and A_W (W, w) the 1-D
    linear-interpolation matrices (PyTorch's own: read off ``F.interpolate(mode="linear")`` of the
    identity), so the adjoint is A_H^T g A_W, applied one axis at a time, the full-resolution H
    axis first. For an integer factor s each output row o = s k + r reads inputs k - 1, k, k + 1
    only: for a 4-D ``grad`` with h, w >= 3, A^T is a depthwise convolution of stride s plus a
    correction at the two edges (:func:`_adjoint_kernel`), one pass over the full-resolution
    tensor per axis; otherwise at most 3 s shifted multiply-adds of strided views (no scatter, no
    copy of the full-resolution tensor). Any other factor uses a dense matmul.
    """
    h, w = (int(v) for v in size)
    big_h, big_w = grad.shape[dims[0]], grad.shape[dims[1]]
    kernels = _adjoint_kernel(h, big_h, float(scale_factor)), _adjoint_kernel(
        w, big_w, float(scale_factor)
    )
    if grad.dim() == 4 and tuple(dims) in ((2, 3), (1, 2)) and None not in kernels:
        if row_scale is not None:
            grad = grad.mul_(row_scale) if overwrite else grad * row_scale
        x = grad if tuple(dims) == (2, 3) else grad.permute(0, 3, 1, 2)  # (N, C, H, W) view
        for axis, n, kernel in ((2, h, kernels[0]), (3, w, kernels[1])):
            x = _adjoint_conv(x, axis, n, kernel)
        return x if tuple(dims) == (2, 3) else x.permute(0, 2, 3, 1)
    out = _linear_adjoint(grad, dims[0], h, big_h, scale_factor, row_scale)
    return _linear_adjoint(out, dims[1], w, big_w, scale_factor)


@functools.lru_cache(maxsize=64)
def _adjoint_kernel(n: int, m: int, scale_factor):
    """The transpose of 1-D linear upsampling (n -> m = s n, integer s, n >= 3) as a strided
    convolution: (kernel, first, last, padding), or None if it is not one.

    Input k receives from outputs s (k - 1) .. s (k + 2) - 1 with weights (right[k - 1],
    center[k], left[k + 1]) of the band (see :func:`_linear_interpolation`). Those are one kernel
    for every interior k (checked), so the adjoint is a convolution of stride s with that kernel
    over the zero-padded axis. The two edge inputs differ (their samples are clamped to the
    edge): ``first`` / ``last`` are the differences of their weights from the kernel's, as
    (output index, weight) pairs, added afterwards."""
    _, band = _linear_interpolation(n, m, scale_factor)
    if band is None or n < 3:
        return None
    center, left, right = band[:3]
    rows = [torch.cat([right[k - 1], center[k], left[k + 1]]) for k in range(1, n - 1)]
    kernel = rows[0]
    if any(not torch.equal(r, kernel) for r in rows[1:]):
        return None
    s = m // n
    first = torch.cat([center[0], left[1]]) - kernel[s:]
    last = torch.cat([right[n - 2], center[n - 1]]) - kernel[: 2 * s]
    # Drop the kernel's zero taps at both ends (for s = 4 the outer two of each neighbour's four:
    # 8 taps, not 12), with the padding cut by as much; only where the two ends match, since
    # conv2d pads both sides alike.
    nonzero = torch.nonzero(kernel).flatten()
    lead, trail = int(nonzero[0]), 3 * s - 1 - int(nonzero[-1])
    trim = min(lead, trail, s)
    kernel = kernel[trim : 3 * s - trim]
    # The edge corrections as (output offset, weight) pairs, their non-zero taps only (for s = 4:
    # outputs 0, 1 onto input 0 with 3/8, 1/8), added row by row (no temporary).
    first = tuple((int(t), float(first[t])) for t in torch.nonzero(first).flatten())
    last = tuple((m - 2 * s + int(t), float(last[t])) for t in torch.nonzero(last).flatten())
    return kernel, first, last, s - trim


def _adjoint_conv(x, axis, n, spec):
    """:func:`_adjoint_kernel`'s convolution of the (N, C, H, W) ``x`` along ``axis`` (2 or 3),
    depthwise (each channel alone): size m -> n there. A strided convolution reads the
    full-resolution gradient once, in one vectorised kernel (on the CPU config: 6.4 ms against
    8.2 ms for the banded multiply-adds of :func:`_linear_adjoint` on a tensor fresh in the cache,
    about the same when it comes cold from memory; fewer kernels on a GPU)."""
    kernel, first, last, pad = spec
    channels, m = x.shape[1], x.shape[axis]
    s = m // n
    view = [1, 1, 1, 1]
    view[axis] = -1
    kernel = kernel.to(x.device, x.dtype).view(view)
    weight = kernel.expand(channels, *kernel.shape[1:]).contiguous()
    stride, padding = [1, 1], [0, 0]
    stride[axis - 2], padding[axis - 2] = s, pad
    y = F.conv2d(x, weight, stride=stride, padding=padding, groups=channels)
    for row, fixes in ((0, first), (n - 1, last)):
        for output, coefficient in fixes:
            y.narrow(axis, row, 1).add_(x.narrow(axis, output, 1), alpha=coefficient)
    return y


@functools.lru_cache(maxsize=64)
def _linear_interpolation(n: int, m: int, scale_factor):
    """1-D interpolation matrix (m, n) of F.interpolate(mode="linear", align_corners=False) and,
    for m = s n, its band (center, left, right) of shape (n, s) each and which phases have a left
    / right weight, or None if not banded."""
    eye = torch.eye(n, dtype=torch.float32)[None]  # (1, n, n): n unit inputs of length n
    a = F.interpolate(eye, scale_factor=scale_factor, mode="linear", align_corners=False)[0].t()
    if a.shape[0] != m:
        raise ValueError(f"upsampling {n} by {scale_factor} gives {a.shape[0]}, not {m}")
    if m % n:
        return a, None
    s = m // n
    a3 = a.reshape(n, s, n)  # [k, r, j]: weight of output s k + r on input j
    k = torch.arange(n)
    center = a3[k, :, k]
    left = torch.zeros(n, s)  # [k, r]: weight of output s k + r on input k - 1
    right = torch.zeros(n, s)  # ... on input k + 1
    left[1:] = a3[k[1:], :, k[1:] - 1]
    right[:-1] = a3[k[:-1], :, k[:-1] + 1]
    rest = a3.clone()
    rest[k, :, k], rest[k[1:], :, k[1:] - 1], rest[k[:-1], :, k[:-1] + 1] = 0, 0, 0
    if rest.abs().max() > 0:
        return a, None
    # Phases r with a weight on k - 1 / k + 1 at all (for s = 4: r = 0, 1 / r = 2, 3).
    has_left = tuple(bool(left[:, r].any()) for r in range(s))
    has_right = tuple(bool(right[:, r].any()) for r in range(s))
    return a, (center, left, right, has_left, has_right)


def _linear_adjoint(grad, dim, n, m, scale_factor, row_scale=None):
    # A^T along ``dim`` of ``grad * row_scale`` (size m there) -> size n there. ``row_scale``
    # (broadcastable to ``grad``, None for 1) is folded into the banded multiply-adds, which saves
    # a pass over the full-resolution ``grad``.
    a, band = _linear_interpolation(n, m, float(scale_factor))
    if band is None:
        if row_scale is not None:
            grad = grad * row_scale
        moved = grad.movedim(dim, -1)
        return (moved @ a.to(grad.device, grad.dtype)).movedim(-1, dim)
    center, left, right = (t.to(grad.device, grad.dtype) for t in band[:3])
    has_left, has_right = band[3:]
    s = m // n
    blocks = grad.unflatten(dim, (n, s))
    scales = None if row_scale is None else row_scale.unflatten(dim, (n, s))
    shape = [1] * grad.dim()
    shape[dim] = -1
    out = None
    for r in range(s):
        x = blocks.select(dim + 1, r)  # outputs s k + r, k = 0..n-1
        x_scale = None if scales is None else scales.select(dim + 1, r)

        def coef(weights, start, length):
            # weights (n,) along dim, times the rows' scale; start/length: the k range
            w = weights[start : start + length].view(shape)
            return w if x_scale is None else w * x_scale.narrow(dim, start, length)

        c = coef(center[:, r], 0, n)
        out = x * c if out is None else out.addcmul_(x, c)
        if n > 1 and has_left[r]:  # output s k + r -> input k - 1
            out.narrow(dim, 0, n - 1).addcmul_(x.narrow(dim, 1, n - 1), coef(left[:, r], 1, n - 1))
        if n > 1 and has_right[r]:  # output s k + r -> input k + 1
            out.narrow(dim, 1, n - 1).addcmul_(x.narrow(dim, 0, n - 1), coef(right[:, r], 0, n - 1))
    return out


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
