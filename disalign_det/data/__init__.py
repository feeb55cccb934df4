"""Data: LVIS-format registration with metadata from the json, class frequencies, and a generated
long-tailed LVIS-format dataset.

Modules, leaves first (each imports only those above it):

* :mod:`.frequency`: LVIS's r/c/f rule and per-class counting (pure maths);
* :mod:`.lvis_json`: reading and validating LVIS-format json, its class summary;
* :mod:`.metadata`: metadata filled on first access;
* :mod:`.lvis_format`: registering any LVIS-format json (``DATASETS.LVIS_FORMAT``);
* :mod:`.class_counts`: the per-class training frequencies n_j of a config's datasets;
* :mod:`.synthetic`: the long-tailed dataset generator (a library whose generating modules import
  only :mod:`.frequency`; command line ``datasets/prepare_synthetic.py``) and its registration,
  generated on first load;
* :mod:`.builtin`: the built-in names, registered at import.

Importing this package registers the built-in datasets ``lvis_v1_train`` / ``lvis_v1_val``,
``lvis_v0.5_train`` / ``lvis_v0.5_val`` (detectron2's, plus frequency metadata read lazily from the
json) and ``lvis_synth_train`` / ``lvis_synth_val`` (generated on first load) under
``$DETECTRON2_DATASETS`` (default ``datasets``), and the classification datasets of
:mod:`.classification` (ImageNet-LT, Places-LT, iNaturalist 2018, the CPU sets ``digits_lt_*`` /
``synth_cls_lt_*``). No json is read and nothing is generated at import.
"""

from .. import compat  # noqa: F401  (shims before detectron2 / lvis are imported)
from .builtin import LVIS_V1_DATASETS, LVIS_V05_DATASETS, register_builtin_datasets
from .class_counts import class_counts_from_cfg, get_class_counts, get_class_frequency_buckets
from .classification import register_builtin_classification
from .classification_cpu import register_cpu_classification
from .frequency import frequency_bucket
from .lvis_format import (
    check_num_classes,
    num_classes_of,
    register_datasets_from_cfg,
    register_lvis_format,
)
from .lvis_json import (
    LVISCategoryInfo,
    LVISFormatError,
    lvis_category_info,
    read_lvis_json,
    validate_lvis_dict,
)
from .synthetic import (
    SYNTH_DATASETS,
    ensure_synthetic_dataset,
    generate_synthetic_lvis,
    register_lvis_synth,
    synthetic_categories,
)

__all__ = [
    "LVISCategoryInfo",
    "LVISFormatError",
    "LVIS_V05_DATASETS",
    "LVIS_V1_DATASETS",
    "SYNTH_DATASETS",
    "check_num_classes",
    "class_counts_from_cfg",
    "ensure_synthetic_dataset",
    "frequency_bucket",
    "generate_synthetic_lvis",
    "get_class_counts",
    "get_class_frequency_buckets",
    "lvis_category_info",
    "num_classes_of",
    "read_lvis_json",
    "register_builtin_datasets",
    "register_datasets_from_cfg",
    "register_lvis_format",
    "register_lvis_synth",
    "synthetic_categories",
    "validate_lvis_dict",
]

register_builtin_datasets()
register_builtin_classification()  # ImageNet-LT, Places-LT, iNaturalist
register_cpu_classification()  # digits_lt_*, synth_cls_lt_*
