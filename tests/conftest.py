"""Shared test setup: the ``tiny_dataset`` fixture; helpers live in ``tests/common.py``.

``disalign_det`` is imported first: its compatibility shims must be in place before any detectron2
module that needs them is imported by a test module.
"""

import disalign_det  # noqa: F401  isort:skip

import pytest
import torch
from common import CONFIGS, REPO, TINY_CLASSES, load_script, make_tiny_dataset, tiny_cfg

# Re-exported for the test modules that import them from conftest.
__all__ = ["CONFIGS", "REPO", "TINY_CLASSES", "load_script", "tiny_cfg"]

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A tiny generated LVIS-format dataset registered as ``tiny_train`` / ``tiny_val``."""
    return make_tiny_dataset(str(tmp_path_factory.mktemp("tiny_lvis")))
