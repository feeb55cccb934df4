"""Shims: the pure-Python detectron2 v0.6 and lvis 0.5.3 on today's numpy, Pillow and torch.

Covers: the pure-Python v0.6 from PyPI (``pb1-detectron2``, no compiled ``detectron2._C``) and
lvis 0.5.3 (``LVISEval.accumulate`` uses ``np.float``). Every shim is feature-detected (it applies
only where the thing it provides is missing) and goes when v0.6 is no longer supported *and* lvis
stops using the removed numpy aliases. ``tests/test_compat.py`` covers each one.

What applies when:

* :func:`prepare_detectron2`, at ``import disalign_det`` (through :mod:`disalign_det.compat`),
  leaves numpy and Pillow as they were and changes nothing on a detectron2 with a compiled
  extension:

  - ``detectron2._C``: where the detectron2 package directory has a compiled ``_C`` file, it is
    imported as detectron2 itself would; when that fails (typically "undefined symbol": built
    against another torch), its ImportError is re-raised with a hint to rebuild detectron2 against
    this torch. Only where there is *no* compiled file (the pure-Python v0.6, whose
    ``detectron2.layers`` cannot be imported otherwise) is a stand-in module installed: it answers
    ``detectron2.utils.collect_env``'s queries and raises :class:`MissingCompiledOpError` for every
    compiled op (deformable/rotated ops, the fast COCO evaluator). Nothing real is hidden by it.
  - Pillow >= 10 removed ``Image.LINEAR`` (and ``CUBIC``, ``ANTIALIAS``); v0.6's
    ``detectron2/data/transforms/transform.py`` reads it as a default argument, i.e. while it is
    imported. Where that source uses a constant Pillow lacks, the constant is set only while
    ``detectron2.data`` is imported and removed again (the default argument keeps its value).

* :func:`apply_legacy_shims`, the one explicit call, for entry points (``tools/*.py``,
  ``tests/conftest.py``) and for users who want it: sets the numpy aliases ``np.int``,
  ``np.float``, ``np.bool``, ``np.object``, ``np.str`` (removed in numpy 1.24) where numpy lacks
  them, for detectron2 v0.6 (``data/build.py``'s class histogram, run by every training data
  loader) and for ``lvis.LVISEval`` used directly (e.g. detectron2's own ``LVISEvaluator``).

* :func:`numpy_aliases`: the same aliases only for the duration of a ``with`` block. The
  library's own LVIS-API backend (:class:`~disalign_det.evaluation.lean_eval.LeanLVISEval`) runs
  ``LVISEval.accumulate`` in one, so the default evaluation path needs no global change.
"""

import contextlib
import importlib
import importlib.util
import logging
import os
import re
import sys
import threading
import types
import warnings

import numpy as np
from PIL import Image

__all__ = [
    "MissingCompiledOpError",
    "applied_shims",
    "apply_legacy_shims",
    "has_compiled_ops",
    "numpy_aliases",
    "prepare_detectron2",
]

logger = logging.getLogger(__name__)

_APPLIED = []


class MissingCompiledOpError(RuntimeError):
    """Raised when code asks for an op of ``detectron2._C`` that this detectron2 install lacks."""


def applied_shims():
    """Names of the shims applied in this process and still in place (scoped ones not listed)."""
    return list(_APPLIED)


def has_compiled_ops():
    """True if detectron2's package directory has a compiled ``_C`` (imported or importable)."""
    mod = sys.modules.get("detectron2._C")
    if mod is not None:
        return not getattr(mod, "_DISALIGN_STANDIN", False)
    try:
        return importlib.util.find_spec("detectron2._C") is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------- detectron2._C
def _make_compiled_standin():
    mod = types.ModuleType("detectron2._C")
    mod._DISALIGN_STANDIN = True
    mod.__doc__ = "Stand-in for detectron2's absent compiled extension (see disalign_det.compat)."

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


def _rebuild_hint(origin, error):
    import torch

    return (
        f"detectron2's compiled extension {origin} failed to import: {error}\n"
        f"It was most likely built against another torch than this one ({torch.__version__}, "
        f"{os.path.dirname(torch.__file__)}). Rebuild detectron2 against this torch in this "
        "environment: `pip install --no-build-isolation --no-deps --no-cache-dir "
        "--force-reinstall <detectron2 source>` (in this repository: "
        "`DISALIGN_DETECTRON2=main bash scripts/install.sh`)."
    )


def _check_compiled_ops():
    """Import the real ``detectron2._C`` (hint on failure), or install the stand-in where the
    detectron2 package has no compiled file at all."""
    if "detectron2._C" in sys.modules:
        return
    spec = importlib.util.find_spec("detectron2._C")  # finds the file, does not load it
    if spec is not None:
        try:
            importlib.import_module("detectron2._C")
        except ImportError as e:
            raise ImportError(_rebuild_hint(spec.origin, e), name="detectron2._C") from e
        return
    import detectron2

    sys.modules["detectron2._C"] = detectron2._C = _make_compiled_standin()
    _APPLIED.append("detectron2._C")


# ---------------------------------------------------------------------------- Pillow constants
# Pillow >= 10 removed the module-level resampling constants in favour of Image.Resampling.
_PIL_CONSTANTS = {"LINEAR": "BILINEAR", "CUBIC": "BICUBIC", "ANTIALIAS": "LANCZOS"}


def _missing_pil_constants_of_transforms():
    """The removed Pillow constants that detectron2's transform.py reads at import time."""
    import detectron2

    path = os.path.join(os.path.dirname(detectron2.__file__), "data", "transforms", "transform.py")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError:  # no source (frozen install): nothing to detect, import as it is
        return {}
    used = set(re.findall(r"\bImage\.(" + "|".join(_PIL_CONSTANTS) + r")\b", source))
    return {old: _PIL_CONSTANTS[old] for old in sorted(used) if not hasattr(Image, old)}


def _import_transforms():
    """Import ``detectron2.data`` with the Pillow constants its transforms read at import time
    set for the duration of the import only."""
    if "detectron2.data.transforms.transform" in sys.modules:
        return
    missing = _missing_pil_constants_of_transforms()
    for old, new in missing.items():
        setattr(Image, old, getattr(Image.Resampling, new))
    try:
        importlib.import_module("detectron2.data")
    finally:
        for old in missing:
            delattr(Image, old)


def prepare_detectron2():
    """What importing detectron2 needs, applied at ``import disalign_det`` (see the module
    docstring): a real ``_C`` or the stand-in where none is compiled, and ``detectron2.data``
    imported with the Pillow constants it reads. Leaves numpy and Pillow unchanged."""
    _check_compiled_ops()
    _import_transforms()


# ---------------------------------------------------------------------------- numpy aliases
# Removed numpy aliases -> the builtins they always meant.
_NUMPY_ALIASES = {"int": int, "float": float, "bool": bool, "object": object, "str": str}
_alias_lock = threading.Lock()
_scoped_users = 0
_scoped_added = []


def _add_numpy_aliases():
    """Set the aliases numpy lacks; returns their names."""
    added = []
    for name, value in _NUMPY_ALIASES.items():
        # numpy >= 1.24 raises AttributeError for these; hasattr is the feature test (numpy 2
        # also warns on the lookup of some of them, which is noise here).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            present = hasattr(np, name)
        if not present:
            setattr(np, name, value)
            added.append(name)
    return added


@contextlib.contextmanager
def numpy_aliases():
    """The removed numpy aliases, set for the duration of the block where numpy lacks them and
    removed again after it (thread-safe: removed when the last overlapping block ends)."""
    global _scoped_users
    with _alias_lock:
        if _scoped_users == 0:
            _scoped_added[:] = _add_numpy_aliases()
        _scoped_users += 1
    try:
        yield
    finally:
        with _alias_lock:
            _scoped_users -= 1
            if _scoped_users == 0:
                for name in _scoped_added:
                    delattr(np, name)
                _scoped_added.clear()


def apply_legacy_shims():
    """Set the removed numpy aliases for the whole process where numpy lacks them (idempotent).

    Needed by detectron2 v0.6 (``data/build.py``, every training data loader) and by ``lvis``
    0.5.3's ``LVISEval`` used directly (detectron2's ``LVISEvaluator``); not by ``import
    disalign_det`` nor by its default evaluation path. The project's entry points call it first.

    Returns:
        list[str]: the shims applied in this process so far (:func:`applied_shims`).
    """
    with _alias_lock:
        added = _add_numpy_aliases()
        # Set by a block open now: global from here on, so that block must not remove it.
        added += [name for name in _scoped_added if f"numpy.{name}" not in _APPLIED]
        _scoped_added.clear()
        _APPLIED.extend(f"numpy.{name}" for name in added)
    if _APPLIED:
        logger.debug("disalign_det.compat applied: %s", ", ".join(_APPLIED))
    return applied_shims()
