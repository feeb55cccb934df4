"""disalign_det.engine.progress: the bar on a terminal, throttled plain lines elsewhere, the
training hook and the evaluation loader wrapper, and tools/demo.py re-rendering a child's lines."""

import io
import sys

import pytest
from conftest import load_script

from disalign_det.engine.progress import (
    ProgressPrinter,
    TrainProgressHook,
    format_duration,
    parse_line,
    progress_style,
    track_loader,
)


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_format_duration():
    assert format_duration(3723.4) == "1:02:03"
    assert format_duration(0) == "0:00:00"
    assert format_duration(None) == "?" and format_duration(float("nan")) == "?"


def test_style_follows_the_stream_and_the_environment(monkeypatch):
    monkeypatch.delenv("DISALIGN_PROGRESS", raising=False)
    assert progress_style(TTY()) == "bar"
    assert progress_style(io.StringIO()) == "lines"
    monkeypatch.setenv("DISALIGN_PROGRESS", "off")
    assert progress_style(TTY()) == "off"
    monkeypatch.setenv("DISALIGN_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="DISALIGN_PROGRESS"):
        progress_style(io.StringIO())


def test_plain_lines_are_throttled_and_carry_eta_and_loss():
    clock, out = FakeClock(), io.StringIO()
    p = ProgressPrinter(10, "train", stream=out, style="lines", interval=5, clock=clock)
    for i in range(1, 11):
        clock.t += 1.0  # 1 s per step
        p.update(i, loss=0.5 / i)
    lines = out.getvalue().splitlines()
    # the first update, then one every 5 s, and always the last one
    assert [parse_line(x)["n"] for x in lines] == [1, 6, 10]
    first, mid, last = (parse_line(x) for x in lines)
    # ETA from the rate since the first update: 5 steps in 5 s, 4 left -> 4 s
    assert mid["eta"] == "0:00:04" and mid["total"] == 10
    assert last["eta"] == "0:00:00" and last["elapsed"] == "0:00:10"
    assert "loss 0.05" in last["rest"]
    assert p.closed
    p.update(11)  # nothing after the end
    assert len(out.getvalue().splitlines()) == 3


def test_bar_redraws_one_line_in_place():
    clock, out = FakeClock(), TTY()
    p = ProgressPrinter(4, "eval", stream=out, style="bar", width=8, clock=clock)
    for i in range(1, 5):
        clock.t += 2.0
        p.update(i)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # only the finished bar ends its line
    frames = text.split("\r\033[K")[1:]
    assert len(frames) == 4
    assert frames[1].startswith("eval [####----] 2/4  50% 0:00:04<0:00:04")
    assert frames[-1].startswith("eval [########] 4/4 100%")


def test_bad_arguments():
    with pytest.raises(ValueError, match="total > 0"):
        ProgressPrinter(0, "x")
    with pytest.raises(ValueError, match="one word"):
        ProgressPrinter(3, "two words")


def test_track_loader_counts_processed_batches():
    out = io.StringIO()
    data = list(range(5))
    tracked = track_loader(data, desc="eval:tiny", stream=out, style="lines", interval=0)
    assert len(tracked) == 5
    assert list(tracked) == data
    ns = [parse_line(x)["n"] for x in out.getvalue().splitlines()]
    # batch i is requested once batch i - 1 was processed: 1..4, then 5 when the loop ends
    assert ns == [1, 2, 3, 4, 5]


def test_train_hook_shows_iterations_and_loss():
    from detectron2.utils.events import EventStorage

    out = io.StringIO()
    hook = TrainProgressHook(3, stream=out, style="lines", interval=0)

    class FakeTrainer:
        iter = 0

    hook.trainer = FakeTrainer()
    with EventStorage(0) as storage:
        hook.trainer.storage = storage
        hook.before_train()
        for it in range(3):
            hook.trainer.iter = it
            storage.iter = it
            storage.put_scalar("total_loss", 2.0 - it)
            hook.after_step()
        hook.after_train()
    lines = [parse_line(x) for x in out.getvalue().splitlines()]
    assert [x["n"] for x in lines] == [1, 2, 3]
    assert [x["rest"] for x in lines] == ["loss 2", "loss 1", "loss 0"]


def test_trainer_registers_the_hook_and_the_eval_tracker(tiny_dataset, tmp_path):
    from conftest import tiny_cfg

    from disalign_det.engine import Trainer
    from disalign_det.engine.progress import _TrackedLoader

    cfg = tiny_cfg(output_dir=str(tmp_path), opts=["MODEL.DEVICE", "cpu"])
    trainer = Trainer(cfg)
    assert sum(isinstance(h, TrainProgressHook) for h in trainer._hooks) == 1
    loader = Trainer.build_test_loader(cfg, "tiny_val")
    assert isinstance(loader, _TrackedLoader) and len(loader) == 12


def test_demo_shows_the_child_progress(tmp_path):
    """tools/demo.py reads the plain progress lines of its train_net.py processes: on a
    non-terminal it prints them (throttled) and keeps them out of the stage log."""
    script = tmp_path / "child.py"
    script.write_text(
        "import sys\n"
        "for i in range(1, 4):\n"
        "    print(f'[progress] train {i}/3 elapsed 0:00:0{i} eta 0:00:00 loss 1.5', flush=True)\n"
        "    print('a log line', flush=True)\n"
    )
    demo = load_script("tools/demo.py")
    out = io.StringIO()
    log = tmp_path / "log.txt"
    rc = demo.stream_child([sys.executable, str(script)], str(log), "stage", out=out, interval=0)
    assert rc == 0
    shown = out.getvalue()
    assert "train 3/3" in shown
    assert "a log line" not in shown  # the log goes to the file
    logged = log.read_text()
    assert logged.count("a log line") == 3
    assert "[progress] train 3/3" in logged  # the final progress line is kept in the log
