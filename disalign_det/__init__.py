"""disalign-det: DisAlign (Zhang et al., CVPR 2021) for long-tail instance segmentation in
Detectron2.

``import disalign_det`` applies the compatibility shims (``disalign_det.compat``), registers the
DisAlign ROI heads, mask head and RPN in detectron2's registries and the built-in datasets
(``lvis_synth_train``/``lvis_synth_val``) in the DatasetCatalog.
"""

from .utils.warnings import install_from_env as _install_quiet_warnings

# Tools ask for their quiet console before detectron2 is imported (see disalign_det.utils.warnings).
_install_quiet_warnings()

from . import compat  # noqa: F401,E402  (must run before detectron2 modules that need the shims)
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
