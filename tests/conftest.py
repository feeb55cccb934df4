"""Shared test setup: the ``tiny_dataset`` fixture; helpers live in ``tests/common.py``.

``disalign_det`` is imported first (it imports detectron2's compiled extension, or installs the
stand-in where there is none, before a test module imports ``detectron2.layers``), then the explicit
legacy shims are applied as every entry point does (numpy aliases for detectron2 v0.6's data loader
and ``lvis.LVISEval`` used directly; ``tests/test_compat.py`` checks a bare import adds none).
"""

import disalign_det  # isort:skip

import pytest
import torch
from common import CONFIGS, REPO, TINY_CLASSES, load_script, make_tiny_dataset, tiny_cfg

disalign_det.compat.apply_legacy_shims()

# Re-exported for the test modules that import them from conftest.
__all__ = ["CONFIGS", "REPO", "TINY_CLASSES", "load_script", "tiny_cfg"]

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A tiny generated LVIS-format dataset registered as ``tiny_train`` / ``tiny_val``."""
    return make_tiny_dataset(str(tmp_path_factory.mktemp("tiny_lvis")))
