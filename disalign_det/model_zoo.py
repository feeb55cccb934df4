"""YAML configs on top of detectron2's model-zoo configs: ``_BASE_: "model_zoo:<path>"``.

A ``_BASE_`` of a YAML config is a path relative to that file, so a stage-two delta cannot name a
config of the installed detectron2 package (``detectron2/model_zoo/configs/``, shipped by
detectron2 built from source). :func:`merge_config_file` reads ``_BASE_`` entries (a string or a
list, as detectron2 allows) of the form ``model_zoo:LVISv0.5-InstanceSegmentation/...yaml`` from
the installed model zoo (``detectron2.model_zoo.get_config_file``) and everything else exactly as
``cfg.merge_from_file`` does. ``tools/train_net.py`` merges its ``--config-file`` with it.
"""

import logging
import os

import yaml
from detectron2.utils.file_io import PathManager

__all__ = ["MODEL_ZOO_PREFIX", "merge_config_file", "model_zoo_config_file"]

logger = logging.getLogger(__name__)

MODEL_ZOO_PREFIX = "model_zoo:"


def model_zoo_config_file(name, referenced_by=None):
    """Local path of the installed detectron2 model-zoo config ``name`` (relative to detectron2's
    ``configs/``); FileNotFoundError naming ``referenced_by`` when the package does not have it."""
    from detectron2 import model_zoo

    try:
        path = model_zoo.get_config_file(name)
    except RuntimeError as e:
        where = f" (_BASE_ of {referenced_by})" if referenced_by else ""
        raise FileNotFoundError(
            f"{MODEL_ZOO_PREFIX}{name}{where} is not in the installed detectron2's model zoo "
            f"({e}). detectron2 built from source ships its configs/; the pure-Python v0.6 from "
            "PyPI (pb1-detectron2) does not: use detectron2 built from source, or give the path "
            "of the YAML file of a detectron2 checkout as _BASE_."
        ) from e
    return path


def _read(filename):
    """(yaml dict, list of its _BASE_ entries resolved as detectron2 resolves them)."""
    with PathManager.open(filename, "r") as f:
        data = yaml.safe_load(f) or {}
    base = data.get("_BASE_") if isinstance(data, dict) else None
    bases = []
    for b in base if isinstance(base, list) else [base] if base is not None else []:
        if not b.startswith(MODEL_ZOO_PREFIX):
            b = os.path.expanduser(b)
            if not b.startswith(("/", "https://", "http://")):
                b = os.path.join(os.path.dirname(filename), b)
        bases.append(b)
    return data, bases


def _uses_model_zoo(filename):
    _, bases = _read(filename)
    return any(b.startswith(MODEL_ZOO_PREFIX) or _uses_model_zoo(b) for b in bases)


def merge_config_file(cfg, filename):
    """``cfg.merge_from_file(filename)``, where the ``_BASE_`` of ``filename`` or of any of its
    bases may name model-zoo configs as ``model_zoo:<path relative to configs/>``.

    Bases are merged in order, then the file's own keys, as detectron2 does; a file whose bases
    never name the model zoo is merged by ``cfg.merge_from_file`` itself. Returns ``cfg``.
    """
    if not _uses_model_zoo(filename):
        cfg.merge_from_file(filename)
        return cfg
    data, bases = _read(filename)
    for b in bases:
        if b.startswith(MODEL_ZOO_PREFIX):
            path = model_zoo_config_file(b[len(MODEL_ZOO_PREFIX) :], filename)
            logger.info("%s: _BASE_ %s is %s", filename, b, path)
            cfg.merge_from_file(path)
        else:
            merge_config_file(cfg, b)
    own = {k: v for k, v in data.items() if k != "_BASE_"}
    # The same merge (and value decoding) as merge_from_file's, minus the _BASE_ handling.
    cfg.merge_from_other_cfg(type(cfg)(own))
    return cfg
