"""``import disalign_det`` registers components and datasets and changes nothing else.

Most checks run in a fresh interpreter (this process has the explicit legacy shims applied by
``conftest.py``): numpy and Pillow hold the same objects before and after the import, our warning
filters are not installed without ``DISALIGN_QUIET_WARNINGS``, detectron2's compiled extension is
the real one (or, where detectron2 has no compiled file, the stand-in), a broken compiled
extension raises its own ImportError with a rebuild hint, and detectron2's own LVIS catalog
entries keep detectron2's loader and metadata.
"""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest
from common import REPO

import disalign_det
from disalign_det import compat

# numpy >= 1.24 lacks these (detectron2 v0.6 and lvis 0.5.3 use them); Pillow >= 10 lacks these.
NUMPY_ALIASES = ("int", "float", "object", "str")
PIL_CONSTANTS = ("LINEAR", "CUBIC", "ANTIALIAS")


def _python(code, pythonpath=(), env=None):
    """Run ``code`` in a fresh interpreter with this checkout (after ``pythonpath``) first."""
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = os.pathsep.join([*pythonpath, REPO, full_env.get("PYTHONPATH", "")])
    full_env.pop("DISALIGN_QUIET_WARNINGS", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env=full_env,
        cwd=REPO,
    )


def _json_of(out):
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


SNAPSHOT = """
    import json, sys, types, warnings
    import numpy, PIL.Image

    def snapshot(module):
        return {k: id(v) for k, v in vars(module).items()}

    before = {"numpy": snapshot(numpy), "PIL.Image": snapshot(PIL.Image)}

    import disalign_det

    report = {"changed": [], "added": []}
    for name, module in (("numpy", numpy), ("PIL.Image", PIL.Image)):
        after = vars(module)
        for k, v in before[name].items():
            if k not in after or id(after[k]) != v:
                report["changed"].append(f"{name}.{k}")
        for k, v in after.items():
            # numpy loads its submodules lazily: another library's import may load one.
            if k not in before[name] and not isinstance(v, types.ModuleType):
                report["added"].append(f"{name}.{k}")
    # Third-party imports add filters of their own; ours must not be among them. Installing ours
    # now adds one entry each only if none was there (filterwarnings replaces a duplicate).
    from disalign_det.utils import warnings as quiet
    count = len(warnings.filters)
    quiet.install()
    report["ours_were_absent"] = len(warnings.filters) - count == len(quiet.THIRD_PARTY_FILTERS)
    c = sys.modules.get("detectron2._C")
    report["standin"] = bool(getattr(c, "_DISALIGN_STANDIN", False))
    report["c_file"] = getattr(c, "__file__", None)
    # Our CPU kernel is compiled on first use, never at import.
    report["cpp_extension"] = "torch.utils.cpp_extension" in sys.modules
    print(json.dumps(report))
"""


def test_import_leaves_numpy_pillow_and_warnings_unchanged():
    report = _json_of(_python(SNAPSHOT))
    assert report["changed"] == [] and report["added"] == [], report
    assert report["ours_were_absent"]  # the quiet console is opt-in (DISALIGN_QUIET_WARNINGS)
    assert not report["cpp_extension"]
    # Where the legacy names are gone from these libraries, the import did not bring them back.
    names = {f"numpy.{n}" for n in NUMPY_ALIASES} | {f"PIL.Image.{n}" for n in PIL_CONSTANTS}
    assert not names & set(report["added"])
    if compat.has_compiled_ops():
        # detectron2 main: the real compiled extension, no stand-in.
        assert not report["standin"]
        assert report["c_file"].endswith(sysconfig.get_config_var("EXT_SUFFIX")), report
    else:
        # The pure-Python v0.6: no compiled file, so the stand-in (detectron2.layers needs it).
        assert report["standin"]


def _write_one_rare_object_gt(path, size, bbox):
    """An LVIS json at ``path``: one image of ``size`` (width, height) with one object of a rare
    category, box ``bbox`` (x, y, w, h) and that rectangle as its polygon. Returns ``path``."""
    x, y, w, h = bbox
    gt = {
        "images": [{"id": 1, "width": size[0], "height": size[1], "neg_category_ids": [],
                    "not_exhaustive_category_ids": []}],
        "categories": [{"id": 1, "name": "a", "frequency": "r"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": list(bbox),
                         "area": float(w * h),
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}],
    }  # fmt: skip
    path.write_text(json.dumps(gt))
    return path


def test_import_without_the_legacy_call_evaluates_with_the_lvis_api(tmp_path):
    # The default backend runs lvis 0.5.3's accumulate (np.float) with the aliases set for that
    # call only: one perfect detection of one rare-category object gives AP = APr = 100.
    _write_one_rare_object_gt(tmp_path / "gt.json", (10, 10), [0, 0, 5, 5])
    code = f"""
        import json
        import numpy as np
        import disalign_det
        from lvis import LVIS
        from disalign_det.evaluation import evaluate_results_on_lvis

        gt = LVIS({str(tmp_path / "gt.json")!r})
        dets = [{{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9}}]
        metrics = evaluate_results_on_lvis(gt, dets, "bbox")
        print(json.dumps({{"AP": metrics["AP"], "APr": metrics["APr"],
                           "float_after": hasattr(np, "float")}}))
    """  # fmt: skip
    report = _json_of(_python(code))
    # Precision 1 at every recall point and IoU threshold (np.mean rounds in the last bit).
    assert report["AP"] == pytest.approx(100.0, abs=1e-9)
    assert report["APr"] == pytest.approx(100.0, abs=1e-9)
    assert report["float_after"] is False


def test_scoped_numpy_aliases_are_removed_after_the_block():
    code = """
        import json
        import numpy as np
        import disalign_det
        from disalign_det.compat import apply_legacy_shims, numpy_aliases

        seen = {"before": hasattr(np, "float")}
        with numpy_aliases():
            with numpy_aliases():  # nested: the outer block still has them after this one
                pass
            seen["inside"] = np.float is float and np.int is int
        seen["after"] = hasattr(np, "float")
        with numpy_aliases():
            apply_legacy_shims()  # made global inside a block: the block must keep them
        seen["global"] = np.float is float
        print(json.dumps(seen))
    """
    seen = _json_of(_python(code))
    if seen["before"]:
        pytest.skip("this numpy still has np.float")
    assert seen == {"before": False, "inside": True, "after": False, "global": True}


def _fake_detectron2(root, so_bytes):
    """A detectron2 package whose compiled extension file is ``so_bytes`` (not a library)."""
    pkg = root / "detectron2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('__version__ = "0.6"\n')
    (pkg / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))).write_bytes(so_bytes)
    return str(root)


def test_broken_compiled_extension_raises_its_own_error_with_a_hint(tmp_path):
    fake = _fake_detectron2(tmp_path, b"not an ELF file")
    plain = _python("import detectron2._C", pythonpath=[fake])
    assert plain.returncode != 0
    loader_error = plain.stderr.strip().splitlines()[-1].split(": ", 1)[1]  # the loader's words

    out = _python("import disalign_det", pythonpath=[fake])
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()
    assert loader_error in out.stderr  # the real error, chained and repeated
    assert "ImportError: detectron2's compiled extension" in out.stderr
    assert "Rebuild detectron2 against this torch" in out.stderr, last[-5:]
    assert "pure-Python" not in out.stderr and "MissingCompiledOpError" not in out.stderr


def test_undefined_symbol_in_compiled_extension_is_reported_not_replaced():
    # The usual fault: detectron2 built against another torch. A finder that "finds" a compiled
    # _C whose loading fails as such a library does.
    code = """
        import importlib.abc, importlib.machinery, sys

        class BrokenLoader(importlib.abc.Loader):
            def create_module(self, spec):
                raise ImportError("_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")

            def exec_module(self, module):
                pass

        class Finder(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "detectron2._C":
                    return importlib.machinery.ModuleSpec(name, BrokenLoader(), origin="/x/_C.so")
                return None

        sys.meta_path.insert(0, Finder())
        try:
            import disalign_det
        except ImportError as e:
            assert "undefined symbol" in str(e.__cause__), e.__cause__
            assert "Rebuild detectron2 against this torch" in str(e), e
            assert "detectron2._C" not in sys.modules
            print("raised")
        else:
            print("imported")
    """
    out = _python(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "raised"


LVIS_NAMES = ("lvis_v1_train", "lvis_v1_val", "lvis_v0.5_train", "lvis_v0.5_val")


def test_detectron2_lvis_entries_are_detectron2s_plus_lazy_class_statistics():
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets.lvis import get_lvis_instances_meta

    # The datasets root as detectron2 read $DETECTRON2_DATASETS when it registered its built-ins
    # (the first import in this process; a tool loaded by an earlier test may set the variable
    # later): the same root for every LVIS entry, detectron2's layout below it.
    root = os.path.dirname(os.path.dirname(MetadataCatalog.get(LVIS_NAMES[0]).json_file))
    for name in LVIS_NAMES:
        # detectron2's register_lvis_instances: its loader, and these fields, nothing else eager.
        assert DatasetCatalog[name].__module__ == "detectron2.data.datasets.lvis", name
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == get_lvis_instances_meta(name)["thing_classes"]
        assert meta.json_file == os.path.join(root, "lvis", f"{name}.json")
        assert meta.image_root == os.path.join(root, "coco/")
        assert meta.evaluator_type == "lvis"
        detectron2_fields = {"name", "thing_classes", "json_file", "image_root", "evaluator_type"}
        assert set(meta.__dict__) <= detectron2_fields | disalign_det.data.metadata.LAZY_KEYS
        # Ours, read from the json on first access (no LVIS download here: it says which file).
        if not os.path.isfile(meta.json_file):
            with pytest.raises(FileNotFoundError, match=f"{name}.json.*datasets/README.md"):
                meta.class_frequency


def test_detectron2_lvis_entries_are_the_same_objects_after_import():
    if not compat.has_compiled_ops():
        pytest.skip("detectron2 v0.6 cannot import detectron2.data on its own (Pillow 10, no _C)")
    code = """
        import json, os
        from detectron2.data import DatasetCatalog, MetadataCatalog

        NAMES = LVIS_NAMES
        loaders = {n: DatasetCatalog[n] for n in NAMES}  # detectron2's, before ours
        fields = {n: dict(MetadataCatalog.get(n).__dict__) for n in NAMES}

        import disalign_det  # noqa: F401

        report = {}
        for n in NAMES:
            meta = MetadataCatalog.get(n)
            report[n] = {
                "same_loader": DatasetCatalog[n] is loaders[n],
                "loader_module": DatasetCatalog[n].__module__,
                "fields_kept": all(meta.__dict__.get(k) == v for k, v in fields[n].items()),
                "added": sorted(set(meta.__dict__) - set(fields[n])),
            }
            if not os.path.isfile(meta.json_file):  # no LVIS download: ours say what is missing
                try:
                    meta.class_frequency
                except FileNotFoundError as e:
                    report[n]["class_frequency"] = str(e)
        print(json.dumps(report))
    """.replace("LVIS_NAMES", repr(LVIS_NAMES))
    report = _json_of(_python(code))
    assert sorted(report) == sorted(LVIS_NAMES)
    for name, r in report.items():
        assert r["same_loader"] and r["loader_module"].startswith("detectron2."), (name, r)
        assert r["fields_kept"], (name, r)
        assert r["added"] == [], (name, r)  # nothing set eagerly: ours are read on first access
        if "class_frequency" in r:
            assert f"{name}.json" in r["class_frequency"], r
            assert "datasets/README.md" in r["class_frequency"], r


def test_per_class_ap_and_stock_lvis_eval_work_without_the_legacy_shims(tmp_path):
    """lab's tables and tools/plot_per_class.py call ``lvis_per_class_ap`` (and a run may use the
    "lvis" backend's stock ``LVISEval``) in a process that never applied the legacy shims; lvis
    0.5.3's ``accumulate`` uses ``np.float``. Both set the alias for their call only: the numbers
    come out (a perfect detection: AP 1) and numpy is left without the alias."""
    path = _write_one_rare_object_gt(tmp_path / "gt.json", (64, 48), [4, 6, 20, 10])
    out = _python(f"""
        import json
        import numpy as np
        from lvis import LVIS, LVISEval, LVISResults
        from disalign_det.evaluation.backends import run_lvis_eval
        from disalign_det.evaluation.per_class import lvis_per_class_ap
        gt = LVIS({str(path)!r})
        det = [{{"image_id": 1, "category_id": 1, "bbox": [4, 6, 20, 10], "score": 0.9}}]
        pc = lvis_per_class_ap(gt, det, "bbox")
        stock = LVISEval(gt, LVISResults(gt, det), "bbox")
        metrics = run_lvis_eval(stock, 300)[0]
        print(json.dumps([float(pc.ap[0]), metrics["AP"], hasattr(np, "float")]))
        """)
    ap, stock_ap, alias_left = _json_of(out)
    assert ap == pytest.approx(1.0) and stock_ap == pytest.approx(100.0) and alias_left is False
