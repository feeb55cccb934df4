"""Kill-and-resume harness shared by the resume tests (``test_resume.py``,
``test_sem_seg_resume.py``): run an entry point in a child process that SIGKILLs itself right after
a checkpoint, resume it in this process, and compare with an uninterrupted run bit for bit."""

import importlib
import json
import os
import signal
import subprocess
import sys

import torch
from common import REPO, load_script

from disalign_det.data.samplers import LOG_BATCHES_ENV

# The entry point of each path: (script, module holding the trainer class ("" = the script),
# trainer class name).
PATHS = {
    "yaml": ("tools/train_net.py", "", "Trainer"),
    "lazy": ("tools/lazyconfig_train_net.py", "disalign_det.lazy.train", "LazyTrainer"),
}

# Runs the entry point with one more hook, after the checkpointer: it SIGKILLs the process at the
# end of iteration $KILL_AFTER_ITER, i.e. right after that iteration's checkpoint is written.
KILLED_RUN = r"""
import os, signal, sys, importlib, importlib.util
import disalign_det
import torch
from detectron2.engine import HookBase

torch.set_num_threads(2)
spec = importlib.util.spec_from_file_location("entry_point", sys.argv[1])
tn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tn)
kill_after = int(os.environ["KILL_AFTER_ITER"])
holder = importlib.import_module(sys.argv[2]) if sys.argv[2] else tn


class Kill(HookBase):
    def after_step(self):
        if self.trainer.iter == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


class KilledTrainer(getattr(holder, sys.argv[3])):
    def build_hooks(self):
        return super().build_hooks() + [Kill()]


setattr(holder, sys.argv[3], KilledTrainer)
tn.cli(sys.argv[4:])
"""


def _output_args(path, output_dir):
    return ["OUTPUT_DIR", output_dir] if path == "yaml" else [f"train.output_dir={output_dir}"]


def _killed_run(config_file, output_dir, kill_after, log_batches="", path="yaml"):
    """Start the entry point of ``path`` in a child process that SIGKILLs itself after iteration
    ``kill_after``."""
    env = dict(os.environ, KILL_AFTER_ITER=str(kill_after), **{LOG_BATCHES_ENV: log_batches})
    script, holder, name = PATHS[path]
    argv = ["--config-file", config_file, *_output_args(path, output_dir)]
    return subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, os.path.join(REPO, script), holder, name, *argv],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _in_process_run(config_file, output_dir, resume, log_batches="", trainers=None, path="yaml"):
    # The same thread count as the child (KILLED_RUN): floating-point reductions, hence the bits
    # of the result, depend on it.
    torch.set_num_threads(2)
    script, holder_name, name = PATHS[path]
    tn = load_script(script)
    holder = importlib.import_module(holder_name) if holder_name else tn
    original = getattr(holder, name)
    if trainers is not None:

        class Recorded(original):
            def __init__(self, cfg):
                super().__init__(cfg)
                trainers.append(self)

        setattr(holder, name, Recorded)
    argv = [
        "--config-file",
        config_file,
        *(["--resume"] if resume else []),
        *_output_args(path, output_dir),
    ]
    old = os.environ.get(LOG_BATCHES_ENV)
    os.environ[LOG_BATCHES_ENV] = log_batches
    try:
        tn.main(tn.default_argument_parser().parse_args(argv))
    finally:
        setattr(holder, name, original)
        if old is None:
            del os.environ[LOG_BATCHES_ENV]
        else:
            os.environ[LOG_BATCHES_ENV] = old


def check_resume_is_exact(tmp_path, config_file, max_iter, period, kill_after=None, path="yaml"):
    """Uninterrupted run vs. run killed after iteration ``kill_after`` and resumed from the last
    checkpoint before it: every tensor of model_final.pth (model, BatchNorm statistics) and the
    optimizer state are bit-identical.

    ``kill_after``: None (right after the first checkpoint) or a function of the uninterrupted
    run's trainer returning the iteration. Returns the final model state, the batches (image ids
    per iteration, ``{iteration: [image_id, ...]}``) of the uninterrupted, killed and resumed runs,
    and the kill iteration."""
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    logs = {k: str(tmp_path / f"batches_{k}.jsonl") for k in ("full", "killed", "resumed")}
    trainers = []
    if kill_after is None:
        kill_after = period - 1
        # The child's interpreter start overlaps with the uninterrupted run in this process.
        child = _killed_run(config_file, killed, kill_after, logs["killed"], path=path)
        _in_process_run(
            config_file, full, False, log_batches=logs["full"], trainers=trainers, path=path
        )
    else:
        _in_process_run(
            config_file, full, False, log_batches=logs["full"], trainers=trainers, path=path
        )
        kill_after = kill_after(trainers[0])
        child = _killed_run(config_file, killed, kill_after, logs["killed"], path=path)
    last = (kill_after + 1) // period * period - 1  # iteration index of the last checkpoint
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
    ckpt = f"model_{last:07d}.pth"
    with open(os.path.join(killed, "last_checkpoint")) as f:
        assert f.read() == ckpt
    assert not os.path.exists(os.path.join(killed, "model_final.pth"))

    _in_process_run(config_file, killed, resume=True, log_batches=logs["resumed"], path=path)
    a = torch.load(os.path.join(full, "model_final.pth"), weights_only=True)
    b = torch.load(os.path.join(killed, "model_final.pth"), weights_only=True)
    assert a["iteration"] == b["iteration"] == max_iter - 1
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), (k, f"killed after iteration {kill_after}")
    opt_a = a["trainer"]["_trainer"]["optimizer"]["state"]
    opt_b = b["trainer"]["_trainer"]["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) > 0
    for i, state in opt_a.items():
        assert torch.equal(state["momentum_buffer"], opt_b[i]["momentum_buffer"]), i
    batches = {k: _read_batches(path) for k, path in logs.items()}
    # Each run logged the iterations it trained, in order.
    assert list(batches["full"]) == list(range(max_iter))
    assert list(batches["killed"]) == list(range(kill_after + 1))
    assert list(batches["resumed"]) == list(range(last + 1, max_iter))
    return a["model"], batches, kill_after


def _read_batches(path):
    ret = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            assert row["rank"] == 0 and row["iter"] not in ret, row
            ret[row["iter"]] = row["image_ids"]
    return ret
