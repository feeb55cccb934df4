"""A trained DisAlign model used where its training json is absent.

Stage one and three stage-two runs (plain, NorCal, tau-norm at test time) are trained on a
generated LVIS-format dataset, each evaluated at the end of its training; the trained model's
detections on the val images are kept. Then the training json is moved away, and with only
``model_final.pth``, its config and the val split:

* ``DefaultPredictor`` gives exactly the detections of the model that was evaluated,
* ``tools/train_net.py --eval-only`` gives exactly the same metrics and the same detections file,
* ``tools/visualize.py`` draws exactly those detections,

while training with the json missing fails naming it. Also: the console filter of the tools hides
a known third-party warning and still shows ours.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, load_script, tiny_cfg

NUM_CLASSES = 6
STAGE_ONE = "synthetic/mask_rcnn_synth.yaml"
STAGE_TWO = "synthetic/disalign_synth.yaml"
POSTHOCS = ("none", "norcal", "tau_norm")
TRAIN, VAL = "deploy_train", "deploy_val"


def _opts(output_dir, *extra):
    return [
        "DATASETS.TRAIN", f"('{TRAIN}',)",
        "DATASETS.TEST", f"('{VAL}',)",
        # Score threshold 0: a model trained for a few iterations still detects something.
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "TEST.DETECTIONS_PER_IMAGE", "10",
        "MODEL.DEVICE", "cpu",
        "OUTPUT_DIR", str(output_dir),
        *extra,
    ]  # fmt: skip


def _predict(cfg, model, images):
    """``model``'s detections through ``DefaultPredictor`` on BGR ``images``."""
    from detectron2.engine import DefaultPredictor

    predictor = DefaultPredictor(cfg)
    predictor.model = model.eval()
    return [predictor(img)["instances"].to("cpu") for img in images]


def _assert_same_detections(got, expected):
    assert len(got) == len(expected)
    assert sum(len(e) for e in expected) > 0  # something to compare
    for g, e in zip(got, expected):
        assert len(g) == len(e)
        assert torch.equal(g.pred_classes, e.pred_classes)
        assert torch.equal(g.scores, e.scores)
        assert torch.equal(g.pred_boxes.tensor, e.pred_boxes.tensor)
        assert torch.equal(g.pred_masks, e.pred_masks)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    from disalign_det.data import generate_synthetic_lvis, register_lvis_format
    from disalign_det.engine import Trainer

    root = tmp_path_factory.mktemp("deploy")
    paths = generate_synthetic_lvis(
        str(root / "data"), seed=3, num_classes=NUM_CLASSES, num_train_images=30,
        num_val_images=12, image_size=64,
    )  # fmt: skip
    register_lvis_format(TRAIN, paths["train_json"], paths["image_root"])
    register_lvis_format(VAL, paths["val_json"], paths["image_root"])
    images = [read_image(d["file_name"], format="BGR") for d in DatasetCatalog.get(VAL)]

    torch.manual_seed(0)
    s1 = Trainer(tiny_cfg(STAGE_ONE, opts=_opts(root / "stage1", "DATASETS.TEST", "()")))
    s1.resume_or_load(resume=False)
    s1.train()
    weights = str(root / "stage1" / "model_final.pth")

    runs = {}
    for posthoc in POSTHOCS:
        out = root / f"disalign_{posthoc}"
        cfg = tiny_cfg(
            STAGE_TWO, opts=_opts(out, "MODEL.WEIGHTS", weights, "MODEL.DISALIGN.POSTHOC", posthoc)
        )
        torch.manual_seed(0)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()  # evaluates on VAL after the last iteration
        with open(out / "metrics_final.json") as f:
            metrics = json.load(f)
        with open(out / "inference" / VAL / "lvis_instances_results.json", "rb") as f:
            results = f.read()
        runs[posthoc] = dict(
            cfg=cfg, out=out, weights=str(out / "model_final.pth"), metrics=metrics,
            results=results, detections=_predict(cfg, trainer.model, images),
        )  # fmt: skip
        assert metrics["bbox"]["AP"] == metrics["bbox"]["AP"]  # not NaN: something was detected

    # From here on there is no training json on disk.
    shutil.move(paths["train_json"], paths["train_json"] + ".moved")
    assert not os.path.exists(paths["train_json"])
    return dict(root=root, paths=paths, images=images, runs=runs)


def _deploy_cfg(run, output_dir, *extra):
    """The run's config for inference: its own weights, another output folder."""
    cfg = run["cfg"].clone()
    cfg.defrost()
    cfg.merge_from_list(["MODEL.WEIGHTS", run["weights"], "OUTPUT_DIR", str(output_dir), *extra])
    cfg.freeze()
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("posthoc", POSTHOCS)
def test_predictor_without_training_json(deployed, tmp_path, posthoc):
    from detectron2.engine import DefaultPredictor

    run = deployed["runs"][posthoc]
    predictor = DefaultPredictor(_deploy_cfg(run, tmp_path))
    got = [predictor(img)["instances"].to("cpu") for img in deployed["images"]]
    _assert_same_detections(got, run["detections"])


@pytest.mark.slow
@pytest.mark.parametrize("posthoc", POSTHOCS)
def test_eval_only_without_training_json(deployed, tmp_path, posthoc):
    from detectron2.engine import default_argument_parser

    run = deployed["runs"][posthoc]
    cfg = _deploy_cfg(run, tmp_path / "eval")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.dump())
    train_net = load_script("tools/train_net.py")
    args = default_argument_parser().parse_args(["--config-file", str(config_file), "--eval-only"])
    train_net.main(args)
    with open(tmp_path / "eval" / "metrics_final.json") as f:
        assert json.load(f) == run["metrics"]
    with open(tmp_path / "eval" / "inference" / VAL / "lvis_instances_results.json", "rb") as f:
        assert f.read() == run["results"]


@pytest.mark.slow
def test_eval_only_in_a_fresh_process_with_only_the_val_split(deployed, tmp_path):
    """The deployment case: a new process, a config that registers only the val json and names
    no training set, the NorCal model (its class counts come from the checkpoint)."""
    run = deployed["runs"]["norcal"]
    paths = deployed["paths"]
    cfg = _deploy_cfg(
        run, tmp_path / "eval",
        "DATASETS.LVIS_FORMAT", repr(((VAL, paths["val_json"], paths["image_root"]),)),
        "DATASETS.TRAIN", "()",
    )  # fmt: skip
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.dump())
    # The child computes with as many threads as this process (conftest sets them): CPU kernels
    # may sum in another order with another thread count, and the bytes must match.
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
         str(config_file), "--eval-only"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "eval" / "metrics_final.json") as f:
        assert json.load(f) == run["metrics"]
    with open(tmp_path / "eval" / "inference" / VAL / "lvis_instances_results.json", "rb") as f:
        assert f.read() == run["results"]


@pytest.mark.slow
def test_visualize_without_training_json(deployed, tmp_path):
    vis = load_script("tools/visualize.py")
    run = deployed["runs"]["none"]
    cfg = _deploy_cfg(run, tmp_path)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.dump())
    out = tmp_path / "vis"
    argv = ["--config-file", str(config_file), "--dataset", VAL, "--num", "12",
            "--confidence", "0", "--output", str(out)]  # fmt: skip
    assert vis.main(argv) == 0
    with open(out / "predictions.json") as f:
        drawn = json.load(f)["images"]
    assert len(drawn) == len(deployed["images"])
    for entry, expected in zip(drawn, run["detections"]):
        want = [
            {"class": int(c), "score": round(float(s), 4), "box": [round(float(v), 1) for v in b]}
            for c, s, b in zip(expected.pred_classes, expected.scores, expected.pred_boxes.tensor)
        ]
        got = [{k: d[k] for k in ("class", "score", "box")} for d in entry["shown"]]
        assert got == want


@pytest.mark.slow
def test_training_without_its_json_fails_clearly(deployed, tmp_path):
    from disalign_det.engine import Trainer

    run = deployed["runs"]["none"]
    cfg = run["cfg"].clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = str(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        Trainer(cfg)
    assert deployed["paths"]["train_json"] in str(e.value)  # names the missing file


@pytest.mark.slow  # two child processes importing detectron2: ~10 s
def test_console_filter_hides_third_party_noise_and_keeps_our_warnings():
    """In a tool's process (DISALIGN_QUIET_WARNINGS=1 before ``import disalign_det``), the
    ``torch.jit.script`` FutureWarning of detectron2's import is gone; our warnings, even with
    the same text, and other third-party warnings still show. Without the variable the
    third-party warning is there (the test can fail)."""
    code = (
        "import warnings\n"
        "import disalign_det\n"
        "warnings.warn_explicit('disalign-own-warning', UserWarning, 'x.py', 1,\n"
        "                      module='disalign_det.modeling.box_predictor')\n"
        "warnings.warn_explicit('`torch.jit.script` is deprecated (ours)', FutureWarning,\n"
        "                      'y.py', 2, module='disalign_det.engine.trainer')\n"
        "warnings.warn_explicit('other-third-party', FutureWarning, 'z.py', 3,\n"
        "                      module='torch.jit._script')\n"
    )

    def run(quiet):
        env = dict(os.environ, PYTHONPATH=REPO, DISALIGN_QUIET_WARNINGS=quiet)
        env.pop("PYTHONWARNINGS", None)
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    quiet, loud = run("1"), run("0")
    assert "`torch.jit.script` is deprecated. Please switch" in loud
    assert "`torch.jit.script` is deprecated. Please switch" not in quiet
    for err in (quiet, loud):
        assert "disalign-own-warning" in err
        assert "`torch.jit.script` is deprecated (ours)" in err
        assert "other-third-party" in err
