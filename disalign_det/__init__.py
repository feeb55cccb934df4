"""disalign-det: DisAlign (Zhang et al., CVPR 2021) for long-tail instance segmentation in
Detectron2.

``import disalign_det`` registers the DisAlign ROI heads, mask head and RPN in detectron2's
registries and the built-in datasets in the DatasetCatalog (``disalign_det.data``), and changes
nothing else: numpy and Pillow stay as they are, and on a detectron2 with a compiled extension it
only imports that extension, as ``detectron2.layers`` would (see ``disalign_det.compat``). What the
pure-Python detectron2 v0.6 needs beyond that is one explicit call,
``disalign_det.compat.apply_legacy_shims()``, made by the project's entry points.

The one opt-in: with ``DISALIGN_QUIET_WARNINGS=1`` in the environment (set by the tools before they
import this package) the known third-party deprecation warnings are filtered
(``disalign_det.utils.warnings``); without it the warning filters are untouched.
"""

from .utils.warnings import install_from_env as _install_quiet_warnings

# The warnings in question are emitted while detectron2 is imported, so the filters go first; an
# environment variable is the only way an entry point can ask for them before this import.
_install_quiet_warnings()

from . import compat  # noqa: F401,E402  (first: a real detectron2._C, or the stand-in where none)
from . import data  # noqa: F401,E402  (registers the built-in datasets)
from . import modeling  # noqa: F401,E402  (registers the modeling components)
from .config import add_disalign_config  # noqa: E402
from .modeling import (  # noqa: E402
    DisAlignCascadeROIHeads,
    DisAlignFastRCNNOutputLayers,
    DisAlignMaskRCNNConvUpsampleHead,
    DisAlignROIHeads,
    grw_class_weights,
)

__version__ = "0.1.0"

__all__ = [
    "add_disalign_config",
    "DisAlignCascadeROIHeads",
    "DisAlignFastRCNNOutputLayers",
    "DisAlignMaskRCNNConvUpsampleHead",
    "DisAlignROIHeads",
    "grw_class_weights",
]
