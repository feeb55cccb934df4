"""Built-in dataset names, registered on ``import disalign_det.data`` (reads no file).

Relative to ``$DETECTRON2_DATASETS`` (default ``datasets``; see ``datasets/README.md``):

* ``lvis_v1_train`` / ``lvis_v1_val`` (1203 classes) and ``lvis_v0.5_train`` / ``lvis_v0.5_val``
  (1230 classes): detectron2's own registration, kept as detectron2 defines it (its loader,
  ``lvis/lvis_v1_*.json`` / ``lvis/lvis_v0.5_*.json`` with images in ``coco/``, its class names,
  ``json_file``, ``image_root`` and ``evaluator_type``), extended with ``class_frequency``,
  ``class_image_count``, ``image_count`` and ``instance_count`` read lazily from the json on first
  access (LVIS train is ~1 GB: nothing is read at import; a missing json raises an error pointing
  at ``datasets/README.md``).
* ``lvis_synth_train`` / ``lvis_synth_val``: the generated dataset (preset ``basic``, the tiny
  20-class fixture) in ``lvis_synth/``, generated on first load (:mod:`.synthetic.cache`).
* ``lvis_synth_lt_train`` / ``lvis_synth_lt_val``: the generated dataset with LVIS's long-tail
  structure (preset ``lvis``: 60 classes in families of fine-grained variants) in
  ``lvis_synth_lt/``, generated on first load; what the demo and the benchmark use.
"""

import functools
import os
from typing import Dict, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .lvis_format import load_lvis_format
from .lvis_json import lvis_category_info
from .metadata import install_lazy_metadata
from .sem_seg_synth import register_sem_seg_synth
from .synthetic import LT_DATASETS, LT_SUBDIR, datasets_root, register_lvis_synth

__all__ = ["LVIS_V05_DATASETS", "LVIS_V1_DATASETS", "LVIS_DATASETS", "register_builtin_datasets"]

# name -> (json path, image root), both relative to the datasets root: detectron2's own paths.
LVIS_V1_DATASETS = {
    "lvis_v1_train": ("lvis/lvis_v1_train.json", "coco/"),
    "lvis_v1_val": ("lvis/lvis_v1_val.json", "coco/"),
}
LVIS_V05_DATASETS = {
    "lvis_v0.5_train": ("lvis/lvis_v0.5_train.json", "coco/"),
    "lvis_v0.5_val": ("lvis/lvis_v0.5_val.json", "coco/"),
}
LVIS_DATASETS = {**LVIS_V1_DATASETS, **LVIS_V05_DATASETS}


def register_lvis_builtin(root: str, datasets: Dict[str, Tuple[str, str]]) -> None:
    """Register ``{name: (json, image root)}`` (relative to ``root``) the way the LVIS built-ins
    are, with the class statistics read lazily from the json.

    A name detectron2 already registers (``lvis_v1_*``, ``lvis_v0.5_*``) is extended, not
    replaced: its loader and every metadata field detectron2 set stay (its own paths, which are
    ``root``'s when ``root`` is ``$DETECTRON2_DATASETS``); only the class statistics are added. Any
    other name is registered here with :func:`~.lvis_format.load_lvis_format`.
    """
    for name, (rel_json, rel_root) in datasets.items():
        if name in DatasetCatalog.list():
            json_file = MetadataCatalog.get(name).json_file
            eager = {}
        else:
            json_file = os.path.join(root, rel_json)
            image_root = os.path.join(root, rel_root)
            DatasetCatalog.register(
                name, functools.partial(load_lvis_format, json_file, image_root, False)
            )
            eager = {"json_file": json_file, "image_root": image_root, "evaluator_type": "lvis"}
        # detectron2's Metadata has no way to compute a field on first access, so the entry
        # becomes a LazyLVISMetadata holding the same fields (DisAlign's class counts come from
        # the json, which must not be read at import).
        install_lazy_metadata(
            name, lambda j=json_file, n=name: lvis_category_info(j, n).metadata(), **eager
        )


_BUILTINS_DONE = False


def register_builtin_datasets(root: Optional[str] = None) -> None:
    """Register ``lvis_v1_{train,val}``, ``lvis_v0.5_{train,val}``, ``lvis_synth_{train,val}`` and
    ``lvis_synth_lt_{train,val}`` (once; reads no file)."""
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    root = datasets_root(root)
    register_lvis_builtin(root, LVIS_DATASETS)
    register_lvis_synth(root)
    register_lvis_synth(root, names=tuple(LT_DATASETS), subdir=LT_SUBDIR, preset="lvis")
    register_sem_seg_synth(root)  # sem_seg_synth_lt_{train,val} (docs/semantic_segmentation.md)
    _BUILTINS_DONE = True
