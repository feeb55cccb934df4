"""Everything that differs between the detectron2s we support, in one place.

* :mod:`.shims` -- patches that make the pure-Python detectron2 v0.6 (PyPI ``pb1-detectron2``) run
  on today's numpy, Pillow and torch (a ``detectron2._C`` stand-in, numpy aliases, Pillow
  constants). Applied when this package is imported, which ``import disalign_det`` does first.
* :mod:`.features` -- feature tests for the detectron2 API differences between v0.6 and current
  main (CPU ``launch``, trainer state, async metric writing, federated loss, LVIS evaluator
  arguments, ...), each with what it covers and when it can be deleted.

Feature detection only: detectron2 v0.6 and current main both report ``__version__ == "0.6"``.
"""

from .shims import MissingCompiledOpError, applied_shims, apply_all, has_compiled_ops

apply_all()

from . import features  # noqa: E402  (after the shims: its tests import detectron2 lazily anyway)

__all__ = [
    "MissingCompiledOpError",
    "applied_shims",
    "apply_all",
    "features",
    "has_compiled_ops",
]
