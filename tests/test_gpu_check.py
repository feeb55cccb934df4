"""tools/gpu_check.py: the table and ratios of a result (maths written out), the stand-ins, and
the CPU dry run of the whole measurement (slow)."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO, load_script


def _result():
    secs = {"s1_iter": 2.0, "s2_iter": 0.55, "s2_forward": 0.5, "infer_plain": 0.1,
            "infer_disalign": 0.102}  # fmt: skip
    return {m: {"seconds": s, "peak_memory_gb": 1.5} for m, s in secs.items()}


def test_ratios_and_table():
    gc = load_script("tools/gpu_check.py")
    r = gc.ratios(_result())
    assert r["s2_iter_over_s2_forward"] == pytest.approx(0.55 / 0.5)
    assert r["s2_iter_over_s1_iter"] == pytest.approx(0.55 / 2.0)
    assert r["infer_disalign_over_plain"] == pytest.approx(1.02)
    assert r["stage_two_hours"] == pytest.approx(9000 * 0.55 / 3600)
    result = {"device": "X", "torch": "t", "cuda": None, "batch": 16, "image_size": [800, 1067],
              "num_classes": 1203, "iters": 3, "warmup": 1, "amp_dtype": "bfloat16",
              "precisions": {"fp32": _result(), "amp": _result()},
              "ratios": {"fp32": r, "amp": r,
                         "amp_over_fp32": {m: 1.0 for m in gc.MEASURES}}}  # fmt: skip
    table = gc.render_table(result)
    assert "| s2_iter | 0.5500 | 0.5500 | 1.00 | 1.5 | 1.5 |" in table
    assert "| stage_two_hours (< 1.0 h) | 1.375 | 1.375 |" in table


def test_standins_import_and_refuse_use(tmp_path):
    gc = load_script("tools/gpu_check.py")
    # Written for a package that is missing only: pretend both are.
    gc._STANDIN_MODULES = {"nocv_standin_test": ["nocv_standin_test", "nocv_standin_test.sub"]}
    assert gc.write_standins(str(tmp_path)) == ["nocv_standin_test"]
    code = (
        "import nocv_standin_test as c; from nocv_standin_test.sub import Polygon; "
        "assert c.__standin__ and c.__version__ == '0.0.0'\n"
        "try:\n    c.imread('x')\nexcept RuntimeError as e:\n    print(e)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert "nocv_standin_test.imread: nocv_standin_test is not installed" in out.stdout


@pytest.mark.slow
def test_cpu_dry_run(tmp_path):
    """``scripts/gpu_check.sh --cpu-dry-run``: the measurement's code paths, tiny, on the CPU."""
    env = {**os.environ, "DISALIGN_PYTHON": sys.executable, "DISALIGN_GPU_CHECK_OUT": str(tmp_path)}
    subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--cpu-dry-run"], cwd=REPO, env=env, check=True,
        timeout=1100,
    )  # fmt: skip
    out = tmp_path / "gpu_check.json"
    result = json.loads(out.read_text())
    gc = load_script("tools/gpu_check.py")
    assert result["dry_run"] and result["complete"] and result["num_classes"] == 1203
    for name in ("fp32", "amp"):
        times = result["precisions"][name]
        assert set(times) == set(gc.MEASURES)
        assert all(math.isfinite(v["seconds"]) and v["seconds"] > 0 for v in times.values())
        assert result["ratios"][name] == pytest.approx(gc.ratios(times))
    assert result["detections_per_image"] and all(n > 0 for n in result["detections_per_image"])
