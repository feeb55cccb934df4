"""Built-in dataset names, registered on ``import disalign_det.data`` (reads no file).

Relative to ``$DETECTRON2_DATASETS`` (default ``datasets``; see ``datasets/README.md``):

* ``lvis_v1_train`` / ``lvis_v1_val`` (1203 classes) and ``lvis_v0.5_train`` / ``lvis_v0.5_val``
  (1230 classes): detectron2's own registration (``lvis/lvis_v1_*.json`` /
  ``lvis/lvis_v0.5_*.json``, images in ``coco/``; the split folder of each image comes from its
  ``coco_url``, so val images of COCO's train2017 are found there) and class names, plus
  ``class_frequency``, ``class_image_count``, ``image_count`` and ``instance_count`` read lazily
  from the json on first access (LVIS train is ~1 GB: nothing is read at import), and a clear error
  when the files are missing.
* ``lvis_synth_train`` / ``lvis_synth_val``: the generated dataset (preset ``basic``, the tiny
  20-class fixture) in ``lvis_synth/``, generated on first load (:mod:`.synthetic_cache`).
* ``lvis_synth_lt_train`` / ``lvis_synth_lt_val``: the generated dataset with LVIS's long-tail
  structure (preset ``lvis``: 60 classes in families of fine-grained variants) in
  ``lvis_synth_lt/``, generated on first load; what the demo and the benchmark use.
"""

import functools
import os
from typing import Callable, Dict, Optional, Tuple

from detectron2.data import DatasetCatalog

from .lvis_format import load_lvis_format
from .lvis_json import README_HINT, lvis_category_info
from .metadata import install_lazy_metadata
from .sem_seg_synth import register_sem_seg_synth
from .synthetic import LT_DATASETS, LT_SUBDIR
from .synthetic_cache import datasets_root, register_lvis_synth

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


def _checked_loader(orig: Callable, json_file: str, image_root: str):
    def load():
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"LVIS json not found: '{json_file}'. {README_HINT}")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"LVIS image root not found: '{image_root}'. {README_HINT}")
        return orig()

    return load


def register_lvis_builtin(root: str, datasets: Dict[str, Tuple[str, str]]) -> None:
    """Register ``{name: (json, image root)}`` (relative to ``root``) the way the LVIS built-ins
    are: detectron2's loader and class names when it has the name, metadata from the json lazily."""
    for name, (rel_json, rel_root) in datasets.items():
        json_file = os.path.join(root, rel_json)
        image_root = os.path.join(root, rel_root)
        if name in DatasetCatalog.list():
            # Keep detectron2's loader and class names; only add a clear missing-file error.
            orig = DatasetCatalog[name]
            DatasetCatalog.remove(name)
            DatasetCatalog.register(name, _checked_loader(orig, json_file, image_root))
        else:
            DatasetCatalog.register(
                name, functools.partial(load_lvis_format, json_file, image_root, False)
            )
        install_lazy_metadata(
            name,
            lambda j=json_file, n=name: lvis_category_info(j, n).metadata(),
            json_file=json_file,
            image_root=image_root,
            evaluator_type="lvis",
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
