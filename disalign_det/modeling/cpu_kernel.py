"""The C++ CPU kernel of the segmentation loss's backward (``disalign_det/csrc/``).

:func:`upsampled_ce_grad` computes the gradient of :func:`~.losses.upsampled_cross_entropy` with
respect to the head's logits in one pass over the full-resolution softmax (see the source file).
PyTorch ops need three (scale, then two strided convolutions, :mod:`.upsample_adjoint`); on the
CPU config (4 images, 61 classes at 128 x 160 pixels, a 20 MB softmax) those passes are most of
what a stage-two iteration adds to the frozen model's forward.

The kernel is compiled on first use by PyTorch's JIT extension builder
(``torch.utils.cpp_extension.load``: a C++ compiler and ninja, about 40 s on 2 cores), cached in
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) and reused by later processes;
``scripts/install.sh`` builds it. Where it cannot be built, or with ``DISALIGN_CPU_KERNEL=0``, the
loss uses the PyTorch ops (the same numbers up to float rounding, tested), with one warning.
Nothing is compiled at import.
"""

import functools
import hashlib
import logging
import os

import torch

from .upsample_adjoint import interpolation_taps

__all__ = ["ENV_VAR", "enabled", "load_cpu_kernel", "upsampled_ce_grad"]

logger = logging.getLogger(__name__)

ENV_VAR = "DISALIGN_CPU_KERNEL"  # "0": never build or use the kernel
SOURCE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "csrc", "upsampled_ce_grad.cpp")


def enabled() -> bool:
    """False where ``DISALIGN_CPU_KERNEL=0`` (read at each call, so a test can switch it)."""
    return os.environ.get(ENV_VAR, "1") != "0"


def extension_name() -> str:
    """The module's name, one per PyTorch installation: the build (and its cache directory) depends
    on that installation's headers and library, so two environments must not share one."""
    key = f"{torch.__version__} {os.path.realpath(torch.__file__)}".encode()
    return f"disalign_det_cpu_{hashlib.sha1(key).hexdigest()[:10]}"


@functools.lru_cache(maxsize=None)
def load_cpu_kernel():
    """The compiled extension module, or None (logged once) where it cannot be built."""
    try:
        from torch.utils.cpp_extension import load

        logger.info("loading the CPU kernel %s (compiled on first use, then cached)", SOURCE)
        # -fopenmp: at::parallel_for is inlined from ATen's headers, and runs serially unless the
        # extension itself is compiled with OpenMP; the library it links (libgomp.so.1) resolves to
        # the one torch has loaded.
        return load(
            name=extension_name(),
            sources=[SOURCE],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as e:  # no compiler or ninja, a read-only cache, a build error
        logger.warning(
            "The C++ CPU kernel of the segmentation loss's backward could not be built (%s: %s); "
            "using PyTorch ops (the same numbers, slower on CPU). Set %s=0 to skip the build.",
            type(e).__name__,
            str(e).strip().splitlines()[-1] if str(e).strip() else "",
            ENV_VAR,
        )
        return None


def upsampled_ce_grad(prob, labels, scale, size, scale_factor):
    """``A_H^T [scale * (prob - onehot(labels))] A_W`` by the C++ kernel, or None where it does
    not apply (not a contiguous float32 CPU tensor, switched off, not built).

    Args:
        prob: (N, H, W, C) float32, the softmax of the upsampled logits.
        labels: (N, H, W) int64 in [0, C) (any such class where ``scale`` is 0).
        scale: (N, H, W) float32 per-pixel gradient scale (0: the pixel is skipped).
        size: (h, w) of the logits; scale_factor: the upsampling factor, as given to
            ``F.interpolate``.

    Returns:
        (N, C, h, w) float32 (contiguous, the logits' layout), or None.
    """
    cpu_float = prob.device.type == "cpu" and prob.dtype == torch.float32 and prob.is_contiguous()
    if not (cpu_float and enabled()):
        return None
    kernel = load_cpu_kernel()
    if kernel is None:
        return None
    h, w = (int(v) for v in size)
    big_h, big_w = prob.shape[1], prob.shape[2]
    row_taps, row_weights = interpolation_taps(h, big_h, float(scale_factor))
    col_taps, col_weights = interpolation_taps(w, big_w, float(scale_factor))
    return kernel.upsampled_ce_grad(
        prob,
        labels.contiguous(),
        scale.to(torch.float32).contiguous(),
        row_taps,
        row_weights,
        col_taps,
        col_weights,
        h,
        w,
    )
