"""Everything that differs between the detectron2s (and lvis) we support, in one place.

* :mod:`.shims` -- what the pure-Python detectron2 v0.6 (PyPI ``pb1-detectron2``) and lvis 0.5.3
  need on today's numpy, Pillow and torch. ``import disalign_det`` runs only
  :func:`prepare_detectron2`, which leaves numpy and Pillow unchanged and, on a detectron2 with a
  compiled extension, only imports that extension (a broken one raises its own ImportError with a
  rebuild hint). The numpy aliases are set by one explicit call, :func:`apply_legacy_shims`, which
  the project's entry points (``tools/*.py``, ``tests/conftest.py``) make first::

      import disalign_det
      disalign_det.compat.apply_legacy_shims()  # detectron2 v0.6 training, lvis.LVISEval directly

* :mod:`.features` -- feature tests for the detectron2 API differences between v0.6 and current
  main, each with what it covers and when it can be deleted.

Feature detection only: detectron2 v0.6 and current main both report ``__version__ == "0.6"``.
"""

from .shims import (
    MissingCompiledOpError,
    applied_shims,
    apply_legacy_shims,
    has_compiled_ops,
    numpy_aliases,
    prepare_detectron2,
)

# Before any detectron2 module that imports ``_C`` or reads Pillow constants at import time.
prepare_detectron2()

from . import features  # noqa: E402  (imports detectron2 lazily, inside its functions)

__all__ = [
    "MissingCompiledOpError",
    "applied_shims",
    "apply_legacy_shims",
    "features",
    "has_compiled_ops",
    "numpy_aliases",
    "prepare_detectron2",
]
