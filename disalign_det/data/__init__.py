"""Data: LVIS-format registration with metadata from the json, class frequencies, and a generated
long-tailed LVIS-format dataset.

Importing this package registers the built-in datasets ``lvis_v1_train`` / ``lvis_v1_val``
(detectron2's, plus frequency metadata read lazily from the json) and ``lvis_synth_train`` /
``lvis_synth_val`` (generated on first load) under ``$DETECTRON2_DATASETS`` (default ``datasets``).
No json is read and nothing is generated at import.
"""

from .. import compat  # noqa: F401  (shims before detectron2 / lvis are imported)
from .datasets import (
    LVISCategoryInfo,
    LVISFormatError,
    check_num_classes,
    ensure_synthetic_dataset,
    lvis_category_info,
    num_classes_of,
    read_lvis_json,
    register_builtin_datasets,
    register_datasets_from_cfg,
    register_lvis_format,
    register_lvis_synth,
    validate_lvis_dict,
)
from .frequency import frequency_bucket, get_class_counts, get_class_frequency_buckets

__all__ = [
    "LVISCategoryInfo",
    "LVISFormatError",
    "check_num_classes",
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


def __getattr__(name):
    # The generator is imported on first use (PEP 562) so that `python -m
    # disalign_det.data.synthetic` does not run a module this package already imported.
    if name in ("generate_synthetic_lvis", "synthetic_categories"):
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register_builtin_datasets()
