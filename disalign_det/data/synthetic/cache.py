"""The generated dataset (:mod:`.generate`) as registered detectron2 datasets, generated on first
load into a cache folder and regenerated when stale.

A copy is current when both jsons exist and record, in ``info["synthetic_params"]``, exactly the
parameters (and generator version) asked for. Its metadata needs no generation: the category list
is a cheap, exact function of the generator's parameters (or read from the json if present).
"""

import fcntl
import functools
import inspect
import json
import logging
import os
from typing import Dict, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..lvis_format import claim_dataset_name, load_lvis_format, mark_registered
from ..lvis_json import category_info_from_dict, lvis_category_info
from ..metadata import install_lazy_metadata
from . import generate

__all__ = [
    "SYNTH_DATASETS",
    "SYNTH_SUBDIR",
    "datasets_root",
    "ensure_synthetic_dataset",
    "register_lvis_synth",
    "synth_paths",
]

logger = logging.getLogger(__name__)

SYNTH_SUBDIR = "lvis_synth"
SYNTH_DATASETS = {"lvis_synth_train": "train", "lvis_synth_val": "val"}
# The parameters the category list depends on: those of synthetic_categories (keyword-only).
_PLAN_KEYS = tuple(
    k
    for k, p in inspect.signature(generate.synthetic_categories).parameters.items()
    if p.kind is p.KEYWORD_ONLY
)


def datasets_root(root: Optional[str] = None) -> str:
    """``root``, else ``$DETECTRON2_DATASETS``, else ``datasets`` (detectron2's rule)."""
    return root if root is not None else os.getenv("DETECTRON2_DATASETS", "datasets")


def synth_paths(root: str, subdir: str = SYNTH_SUBDIR) -> Dict[str, str]:
    """Where the generator writes under ``root/subdir`` (its own file names)."""
    out = os.path.join(root, subdir)
    return {
        "out_dir": out,
        "train_json": os.path.join(out, generate.TRAIN_JSON),
        "val_json": os.path.join(out, generate.VAL_JSON),
        "image_root": os.path.join(out, generate.IMAGES_DIR, ""),
    }


def _params_on_disk(json_file: str) -> Optional[dict]:
    try:
        with open(json_file) as f:
            info = json.load(f).get("info", {})
    except (OSError, ValueError):
        return None
    return info.get("synthetic_params") if isinstance(info, dict) else None


def _synth_is_current(paths: Dict[str, str], expected: dict) -> bool:
    """Both jsons exist and were written by this generator version with these parameters."""
    return all(
        os.path.isfile(paths[k]) and _params_on_disk(paths[k]) == expected
        for k in ("train_json", "val_json")
    )


def ensure_synthetic_dataset(
    root: Optional[str] = None, subdir: str = SYNTH_SUBDIR, **gen_kwargs
) -> Dict[str, str]:
    """Generate the synthetic dataset under ``root/subdir`` unless it is already there, generated
    with the same parameters by the same generator version (``info["synthetic_params"]``).

    A stale copy (other parameters or an older generator) is regenerated in place. Safe when several
    processes start at once: generation happens under an exclusive file lock, and the jsons (written
    last, atomically) mark a complete dataset.
    """
    paths = synth_paths(datasets_root(root), subdir)
    expected = generate.generation_params(**gen_kwargs)
    if _synth_is_current(paths, expected):
        return paths
    os.makedirs(paths["out_dir"], exist_ok=True)
    with open(os.path.join(paths["out_dir"], ".synthetic.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # Another process may have finished while we waited for the lock.
            if not _synth_is_current(paths, expected):
                stale = [paths[k] for k in ("train_json", "val_json") if os.path.isfile(paths[k])]
                if stale:
                    logger.warning(
                        "%s was generated with other parameters or an older generator: "
                        "regenerating it with %s",
                        paths["out_dir"],
                        expected,
                    )
                    # Jsons first: a reader must never pair an old json with new images.
                    for f in stale:
                        os.remove(f)
                logger.info("Generating the synthetic LVIS dataset in %s", paths["out_dir"])
                generate.generate_synthetic_lvis(paths["out_dir"], **gen_kwargs)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return paths


def _synth_metadata(paths: Dict[str, str], split: str, gen_kwargs: dict) -> dict:
    if _synth_is_current(paths, generate.generation_params(**gen_kwargs)):
        return lvis_category_info(paths[f"{split}_json"]).metadata()
    # Not generated (or stale, hence regenerated on load): the categories are an exact function
    # of the generator's parameters, no rendering needed.
    plan_kwargs = {k: v for k, v in gen_kwargs.items() if k in _PLAN_KEYS}
    cats = generate.synthetic_categories(**plan_kwargs)
    return category_info_from_dict({"categories": cats}, paths[f"{split}_json"]).metadata()


def _load_synth(name, split, root, subdir, gen_kwargs):
    paths = ensure_synthetic_dataset(root, subdir, **gen_kwargs)
    json_file = paths[f"{split}_json"]
    on_disk = lvis_category_info(json_file, name).metadata()
    meta = MetadataCatalog.get(name)
    # Safety net: metadata computed earlier in this process must describe the data now on disk.
    if any(meta.get(k) != on_disk[k] for k in ("thing_classes", "image_count", "instance_count")):
        raise ValueError(
            f"{json_file} does not match the metadata of dataset '{name}' (generated with other "
            f"parameters than {gen_kwargs or 'the defaults'}?); delete '{paths['out_dir']}' to "
            "regenerate it"
        )
    return load_lvis_format(json_file, paths["image_root"])


def register_lvis_synth(
    root: Optional[str] = None,
    names: Sequence[str] = tuple(SYNTH_DATASETS),
    subdir: str = SYNTH_SUBDIR,
    **gen_kwargs,
) -> None:
    """Register the generated dataset's (train, val) under ``names``, data in ``root/subdir``.

    The data is generated (``generate_synthetic_lvis(**gen_kwargs)``) on the first load; metadata
    needs no generation. Registering again with the same arguments is a no-op.
    """
    # Absolute, so that a later chdir does not move the data away from the metadata.
    root = os.path.abspath(datasets_root(root))
    paths = synth_paths(root, subdir)
    image_root = paths["image_root"]
    for name, split in zip(names, ("train", "val")):
        json_file = os.path.abspath(paths[f"{split}_json"])
        if not claim_dataset_name(name, json_file, image_root):
            continue
        DatasetCatalog.register(
            name, functools.partial(_load_synth, name, split, root, subdir, dict(gen_kwargs))
        )
        mark_registered(name, json_file, image_root)
        install_lazy_metadata(
            name,
            functools.partial(_synth_metadata, paths, split, dict(gen_kwargs)),
            json_file=json_file,
            image_root=image_root,
            evaluator_type="lvis",
        )
