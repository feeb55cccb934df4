"""Shims: detectron2 v0.6 (pure Python) on today's numpy, Pillow and torch.

Covers: the pure-Python v0.6 from PyPI (``pb1-detectron2``) and lvis 0.5.3. Can go when v0.6 is no
longer supported *and* lvis stops using the numpy aliases (the ``_C`` stand-in and the Pillow
constants are never applied on detectron2 main; the numpy aliases still are, for lvis).

Every shim here is *feature-detected*: it applies only when the thing it patches is missing, so on
an official detectron2 build with a matching numpy/Pillow this module changes nothing. Each shim is
covered by ``tests/test_compat.py``.

This module must be imported before anything from ``detectron2`` that needs it; ``import
disalign_det`` does that first (through ``disalign_det.compat``).

Shims:

* ``detectron2._C``: the compiled extension is absent from the PyPI copy of v0.6. A Mask R-CNN needs
  no op from it (RoIAlign and NMS come from torchvision), but several modules import it at import
  time. A stand-in module is installed that answers the environment queries of
  ``detectron2.utils.collect_env`` and raises a clear :class:`MissingCompiledOpError` for every
  compiled op (deformable/rotated ops, the fast COCO evaluator).
* numpy aliases (``np.int``, ``np.float``, ``np.bool``, ``np.object``, ``np.str``) removed in
  numpy 1.24 but still used by detectron2 v0.6 (``data/build.py``) and ``lvis`` 0.5.3
  (``LVISEval.accumulate``).
* ``PIL.Image.LINEAR`` (and friends) removed in Pillow 10 but used as a default argument in
  ``detectron2/data/transforms/transform.py``.
"""

import importlib
import importlib.util
import logging
import sys
import types
import warnings

import numpy as np
from PIL import Image

__all__ = ["MissingCompiledOpError", "apply_all", "applied_shims", "has_compiled_ops"]

logger = logging.getLogger(__name__)

_APPLIED = []


class MissingCompiledOpError(RuntimeError):
    """Raised when code asks for an op of ``detectron2._C`` that this detectron2 install lacks."""


def applied_shims():
    """Names of the shims that were needed (and applied) in this process."""
    return list(_APPLIED)


def has_compiled_ops():
    """True if a real, compiled ``detectron2._C`` is importable."""
    mod = sys.modules.get("detectron2._C")
    if mod is not None:
        return not getattr(mod, "_DISALIGN_STANDIN", False)
    try:
        return importlib.util.find_spec("detectron2._C") is not None
    except (ImportError, ValueError):
        return False


def _make_compiled_standin():
    mod = types.ModuleType("detectron2._C")
    mod._DISALIGN_STANDIN = True
    mod.__doc__ = "Stand-in for detectron2's missing compiled extension (see disalign_det.compat)."

    # Queried by detectron2.utils.collect_env (default_setup prints the environment).
    mod.get_compiler_version = lambda: "not compiled (pure-Python detectron2)"
    mod.get_cuda_version = lambda: "not compiled"
    mod.has_cuda = lambda: False

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingCompiledOpError(
            f"detectron2._C.{name} is a compiled op, and this detectron2 was installed without its "
            "C++/CUDA extension (pure-Python v0.6). Mask R-CNN does not need it; deformable or "
            "rotated ops and the fast COCO evaluator (use_fast_impl=True) do. Install detectron2 "
            "from source to use them, or use COCOEvaluator(..., use_fast_impl=False)."
        )

    mod.__getattr__ = __getattr__
    return mod


def _shim_compiled_ops():
    if "detectron2._C" in sys.modules:
        return
    try:
        importlib.import_module("detectron2._C")
        return
    except ImportError:
        pass
    sys.modules["detectron2._C"] = _make_compiled_standin()
    try:
        import detectron2

        detectron2._C = sys.modules["detectron2._C"]
    except ImportError:  # detectron2 itself absent: nothing to shim
        del sys.modules["detectron2._C"]
        return
    _APPLIED.append("detectron2._C")


# Removed numpy aliases -> the builtins they always meant.
_NUMPY_ALIASES = {"int": int, "float": float, "bool": bool, "object": object, "str": str}


def _shim_numpy_aliases():
    for name, value in _NUMPY_ALIASES.items():
        # numpy >= 1.24 raises AttributeError for these; hasattr is the feature test (numpy 2
        # also warns on the lookup of some of them, which is noise here).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            present = hasattr(np, name)
        if not present:
            setattr(np, name, value)
            _APPLIED.append(f"numpy.{name}")


# Pillow >= 10 removed the module-level resampling constants in favour of Image.Resampling.
_PIL_CONSTANTS = {"LINEAR": "BILINEAR", "CUBIC": "BICUBIC", "ANTIALIAS": "LANCZOS"}


def _shim_pil_constants():
    resampling = getattr(Image, "Resampling", None)
    for old, new in _PIL_CONSTANTS.items():
        if hasattr(Image, old):
            continue
        value = getattr(Image, new, None)
        if value is None and resampling is not None:
            value = getattr(resampling, new)
        setattr(Image, old, value)
        _APPLIED.append(f"PIL.Image.{old}")


def apply_all():
    """Apply every needed shim (idempotent). Returns the list of shims applied so far."""
    _shim_numpy_aliases()
    _shim_pil_constants()
    _shim_compiled_ops()
    if _APPLIED:
        logger.debug("disalign_det.compat applied: %s", ", ".join(_APPLIED))
    return applied_shims()
