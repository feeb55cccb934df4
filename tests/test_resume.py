"""Interrupted runs resume exactly: a ``tools/train_net.py`` process SIGKILLed right after a
checkpoint, restarted with ``--resume``, ends bit-identical to an uninterrupted run (stage one and
stage two); a save that fails half-way leaves the previous checkpoint and ``last_checkpoint``
intact."""

import disalign_det  # noqa: F401  isort:skip

import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, load_script, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from disalign_det.engine import DisAlignCheckpointer

TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")

# Runs tools/train_net.py with one more hook, after the checkpointer: it SIGKILLs the process at
# the end of iteration $KILL_AFTER_ITER, i.e. right after that iteration's checkpoint is written.
KILLED_RUN = r"""
import os, signal, sys, importlib.util
import disalign_det
import torch
from detectron2.engine import HookBase

torch.set_num_threads(2)
spec = importlib.util.spec_from_file_location("train_net", sys.argv[1])
tn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tn)
kill_after = int(os.environ["KILL_AFTER_ITER"])


class Kill(HookBase):
    def after_step(self):
        if self.trainer.iter == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


class KilledTrainer(tn.Trainer):
    def build_hooks(self):
        return super().build_hooks() + [Kill()]


tn.Trainer = KilledTrainer
tn.cli(sys.argv[2:])
"""


def _config_file(tmp_path, tiny_dataset, config, opts):
    """A tiny config file that registers the tiny dataset itself (for the child process)."""
    lvis_format = repr(((("tiny_train", tiny_dataset["train_json"], tiny_dataset["image_root"])),))
    cfg = tiny_cfg(config, "", ["DATASETS.LVIS_FORMAT", lvis_format, *opts])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.dump())
    return str(path)


def _killed_run(config_file, output_dir, kill_after):
    """Start train_net in a child process that SIGKILLs itself after iteration ``kill_after``."""
    env = dict(os.environ, KILL_AFTER_ITER=str(kill_after))
    argv = ["--config-file", config_file, "OUTPUT_DIR", output_dir]
    return subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, TRAIN_NET, *argv],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _in_process_run(config_file, output_dir, resume):
    # The same thread count as the child (KILLED_RUN): floating-point reductions, hence the bits
    # of the result, depend on it.
    torch.set_num_threads(2)
    tn = load_script("tools/train_net.py")
    argv = [
        "--config-file",
        config_file,
        *(["--resume"] if resume else []),
        "OUTPUT_DIR",
        output_dir,
    ]
    tn.main(tn.default_argument_parser().parse_args(argv))


def _check_resume_is_exact(tmp_path, config_file, max_iter, period):
    """Uninterrupted run vs. run killed after the first checkpoint and resumed: every tensor of
    model_final.pth (model, BatchNorm statistics) and the optimizer state are bit-identical."""
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    last = period - 1  # iteration index of the first checkpoint
    # The child's interpreter start overlaps with the uninterrupted run in this process.
    child = _killed_run(config_file, killed, kill_after=last)
    _in_process_run(config_file, full, resume=False)
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
    ckpt = f"model_{last:07d}.pth"
    with open(os.path.join(killed, "last_checkpoint")) as f:
        assert f.read() == ckpt
    assert not os.path.exists(os.path.join(killed, "model_final.pth"))

    _in_process_run(config_file, killed, resume=True)
    a = torch.load(os.path.join(full, "model_final.pth"), weights_only=True)
    b = torch.load(os.path.join(killed, "model_final.pth"), weights_only=True)
    assert a["iteration"] == b["iteration"] == max_iter - 1
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    opt_a = a["trainer"]["_trainer"]["optimizer"]["state"]
    opt_b = b["trainer"]["_trainer"]["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) > 0
    for i, state in opt_a.items():
        assert torch.equal(state["momentum_buffer"], opt_b[i]["momentum_buffer"]), i
    return a["model"]


@pytest.fixture(scope="module")
def stage_one_weights(tiny_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("resume_stage1"))
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(std=0.05)
    DetectionCheckpointer(model, out).save("stage1")
    return os.path.join(out, "stage1.pth")


@pytest.mark.slow
def test_stage_two_resumes_bit_identical(tiny_dataset, stage_one_weights, tmp_path):
    # The default horizontal flip draws from numpy and the 32 sampled RoIs per image from torch,
    # so both RNG streams must continue exactly where the killed run stopped.
    opts = [
        "MODEL.WEIGHTS", stage_one_weights,
        "SOLVER.BASE_LR", "0.5",
        "SOLVER.MAX_ITER", "4",
        "SOLVER.CHECKPOINT_PERIOD", "2",
    ]  # fmt: skip
    config = _config_file(tmp_path, tiny_dataset, "synthetic/disalign_synth.yaml", opts)
    final = _check_resume_is_exact(tmp_path, config, max_iter=4, period=2)
    # Stage two did train the calibration in those iterations.
    assert not torch.equal(
        final["roi_heads.box_predictor.logit_scale"],
        torch.ones_like(final["roi_heads.box_predictor.logit_scale"]),
    )


@pytest.mark.slow
def test_stage_one_resumes_bit_identical(tiny_dataset, tmp_path):
    # Killed after the first iteration: the second one needs the restored momentum, BatchNorm
    # statistics, RNG states and data position to match.
    opts = ["SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1"]
    config = _config_file(tmp_path, tiny_dataset, "synthetic/mask_rcnn_synth.yaml", opts)
    _check_resume_is_exact(tmp_path, config, max_iter=2, period=1)


def _failing_save(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 the first bytes of a zip archive")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("name", ["model_0000005", "model_final"])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, name):
    model = torch.nn.Linear(3, 2)
    checkpointer = DisAlignCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000002")
    checkpointer.save("model_final")
    checkpointer.tag_last_checkpoint("model_0000002.pth")
    files = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(OSError, match="No space left on device"):
        checkpointer.save(name)
    monkeypatch.undo()

    # Same files, same bytes: no partial target, no temporary file, last_checkpoint untouched.
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == files
    assert files["last_checkpoint"] == b"model_0000002.pth"
    restored = torch.nn.Linear(3, 2)
    DisAlignCheckpointer(restored, str(tmp_path)).resume_or_load("", resume=True)
    for k, v in restored.state_dict().items():
        assert torch.equal(v, saved[k]), k
