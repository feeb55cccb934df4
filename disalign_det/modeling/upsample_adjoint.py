"""The adjoint (transpose) of bilinear upsampling, ``F.interpolate(mode="bilinear",
align_corners=False)``, applied to a gradient without autograd: the backward of the
semantic-segmentation GRW loss (:func:`~.losses.upsampled_cross_entropy`) maps the full-resolution
gradient to the logits' resolution with it."""

import functools

import torch
import torch.nn.functional as F

__all__ = ["bilinear_upsample_adjoint", "interpolation_taps"]


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
def interpolation_taps(n: int, m: int, scale_factor):
    """The (at most two) inputs each output of 1-D linear interpolation n -> m reads: (taps,
    weights) of shape (m, 2), int64 input indices and float32 weights, read off PyTorch's own
    interpolation matrix (:func:`_linear_interpolation`); a missing second tap has weight 0 (and
    index 0). The C++ CPU kernel (:mod:`.cpu_kernel`) reads the transpose through them."""
    a, _ = _linear_interpolation(n, m, scale_factor)
    taps = torch.zeros(m, 2, dtype=torch.int64)
    weights = torch.zeros(m, 2, dtype=torch.float32)
    for o in range(m):
        nonzero = torch.nonzero(a[o]).flatten()
        if len(nonzero) > 2:  # not linear interpolation
            raise ValueError(f"output {o} of {n} -> {m} reads {len(nonzero)} inputs")
        taps[o, : len(nonzero)] = nonzero
        weights[o, : len(nonzero)] = a[o, nonzero]
    return taps, weights


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
