"""Each compatibility shim: applied where needed, and what it provides behaves as expected.

``conftest.py`` makes the explicit call every entry point makes, ``apply_legacy_shims()``; what a
bare ``import disalign_det`` does (and does not) is checked in ``test_import_clean.py``.
"""

import inspect
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from disalign_det import compat


def test_numpy_aliases_are_the_builtins():
    # detectron2 v0.6 data/build.py and lvis 0.5.3 eval.py use these (set by the explicit call).
    assert np.int is int and np.float is float and np.object is object
    assert np.zeros(3, dtype=np.float).dtype == np.float64
    assert np.arange(3).astype(np.int).dtype.kind == "i"


def test_pil_linear_constant():
    # The default argument of detectron2's ExtentTransform is evaluated at import time: v0.6
    # reads Image.LINEAR there (set during that import only, where Pillow >= 10 lacks it).
    from detectron2.data.transforms import ExtentTransform

    default = inspect.signature(ExtentTransform.__init__).parameters["interp"].default
    assert default == Image.BILINEAR
    t = ExtentTransform(src_rect=(0, 0, 4, 4), output_size=(2, 2))
    out = t.apply_image(np.zeros((4, 4, 3), dtype=np.uint8))
    assert out.shape == (2, 2, 3)


def test_compiled_ops_standin_answers_env_queries_and_raises_on_ops():
    import detectron2._C as C

    if compat.has_compiled_ops():
        pytest.skip("an official detectron2 with compiled ops is installed")
    assert "detectron2._C" in compat.applied_shims()
    assert isinstance(C.get_compiler_version(), str)
    assert C.has_cuda() is False
    with pytest.raises(compat.MissingCompiledOpError, match="deform_conv_forward.*pure-Python"):
        C.deform_conv_forward
    # detectron2's environment report (default_setup prints it) works.
    from detectron2.utils.collect_env import collect_env_info

    assert "detectron2" in collect_env_info()


def test_layers_and_lvis_eval_import_with_shims():
    from detectron2.evaluation import LVISEvaluator  # noqa: F401
    from detectron2.layers import DeformConv, ROIAlign  # noqa: F401
    from lvis import LVISEval  # noqa: F401


def test_apply_legacy_shims_is_idempotent():
    before = compat.applied_shims()
    assert compat.apply_legacy_shims() == before


@pytest.mark.slow
def test_standin_is_needed_before_detectron2_layers():
    # In a fresh interpreter, importing detectron2.layers first fails on the pure-Python v0.6
    # unless the stand-in is installed; with ``import disalign_det`` first it works. On a build
    # with a compiled extension both work, and the import applied no shim at all.
    code = (
        "import disalign_det, detectron2.layers, detectron2.data;"
        "from disalign_det import compat; print(sorted(compat.applied_shims()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if not compat.has_compiled_ops():
        assert out.stdout.strip() == "['detectron2._C']"
    else:
        assert out.stdout.strip() == "[]"


def test_feature_tests_agree_on_one_detectron2():
    # The two supported installs: v0.6 (pure Python) lacks every feature of main, and main has
    # them all; a mix means a feature test looks at the wrong thing.
    from disalign_det.compat import features

    found = {
        name: getattr(features, name)()
        for name in (
            "launch_supports_cpu",
            "trainer_supports_async_write_metrics",
            "has_federated_loss",
        )
    }
    assert len(set(found.values())) == 1, found
    assert all(found.values()) == compat.has_compiled_ops(), found


def test_local_process_group_helper_matches_comm(tmp_path):
    # One process, gloo: the helper sets up the group that comm.get_local_rank/_size read.
    import torch.distributed as dist
    from detectron2.utils import comm

    from disalign_det.compat import features

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", world_size=1, rank=0)
    try:
        before = getattr(comm, "_LOCAL_PROCESS_GROUP", None)
        if before is None:
            features.create_local_process_group(1)
        assert comm.get_local_size() == 1 and comm.get_local_rank() == 0
    finally:
        if getattr(comm, "_LOCAL_PROCESS_GROUP", None) is not None and before is None:
            comm._LOCAL_PROCESS_GROUP = None
        dist.destroy_process_group()
