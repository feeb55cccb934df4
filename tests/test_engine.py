"""The engine's fragile spots on detectron2 main and v0.6: non-finite losses with async metric
writing, trainer state round trips, checkpoints through the path manager, and ``launch``."""

import importlib
import io
import logging
import os

import pytest
import torch
from conftest import tiny_cfg
from detectron2.utils.events import EventStorage
from iopath.common.file_io import PathHandler, PathManager

from disalign_det.compat import features
from disalign_det.engine import DisAlignCheckpointer, Trainer
from disalign_det.engine.loop import SimpleTrainLoop

# The module (``disalign_det.engine.launch`` the attribute is the function).
launch_module = importlib.import_module("disalign_det.engine.launch")

needs_async = pytest.mark.skipif(
    not features.trainer_supports_async_write_metrics(),
    reason="this detectron2 (v0.6) has no SimpleTrainer(async_write_metrics=...)",
)


class _ToyModel(torch.nn.Module):
    """One weight; its loss is NaN when ``poison`` is set."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.poison = False

    def forward(self, batch):
        loss = (self.w * batch).sum()
        return {"loss_a": loss * float("nan") if self.poison else loss, "loss_b": loss.abs()}


def _toy_trainer(**kwargs):
    model = _ToyModel()
    data = iter(lambda: torch.ones(3), None)  # infinite
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return SimpleTrainLoop(model, data, opt, **kwargs), model


@pytest.mark.parametrize(
    "kwargs", [pytest.param({}, id="sync"), pytest.param({"async_write_metrics": True}, id="async")]
)
def test_non_finite_loss_skips_the_step(kwargs):
    if kwargs and not features.trainer_supports_async_write_metrics():
        pytest.skip("this detectron2 (v0.6) has no SimpleTrainer(async_write_metrics=...)")
    trainer, model = _toy_trainer(**kwargs)
    with EventStorage(0):
        trainer.iter = 0
        trainer.run_step()  # a finite step moves the weight
        moved = model.w.detach().clone()
        assert not torch.equal(moved, torch.ones(3))
        model.poison = True
        trainer.iter = 1
        # Raised in the main thread, even when metrics are written by a worker thread (where
        # detectron2's own check runs after the optimizer step has been taken).
        with pytest.raises(FloatingPointError, match=r"iteration=1: loss_a=nan.*learning rate"):
            trainer.run_step()
        trainer.concurrent_executor.shutdown(wait=True) if kwargs else None
    assert torch.equal(model.w.detach(), moved)  # the step of iteration 1 was not applied
    assert torch.isfinite(model.w).all()


@needs_async
def test_async_metric_writing_still_records_the_losses():
    trainer, model = _toy_trainer(async_write_metrics=True)
    with EventStorage(0) as storage:
        trainer.iter = 0
        trainer.run_step()
        trainer.concurrent_executor.shutdown(wait=True)
        latest = storage.latest()
    assert latest["total_loss"][0] == pytest.approx(3.0 + 3.0)  # loss_a + loss_b at w = 1


def test_non_finite_loss_at_a_runs_first_iteration_blames_the_loaded_weights():
    # No step has been taken yet (a frozen stage two fed a broken stage one, say): advising a lower
    # learning rate would send the user the wrong way.
    trainer, model = _toy_trainer()
    model.poison = True
    with EventStorage(0):
        trainer.iter = trainer.start_iter = 0
        with pytest.raises(
            FloatingPointError, match=r"first iteration.*train\.init_checkpoint"
        ) as e:
            trainer.run_step()
    assert "learning rate" not in str(e.value)
    assert torch.equal(model.w.detach(), torch.ones(3))


def test_a_resumed_runs_first_iteration_is_told_apart_by_the_inner_loop():
    # Both trainers run steps through ResumableLoopMixin.run_step; its inner loop must see where the
    # (resumed) run started, not only the iteration.
    from detectron2.engine import TrainerBase

    from disalign_det.engine.loop import ResumableLoopMixin

    class Outer(ResumableLoopMixin, TrainerBase):
        pass

    outer = Outer()
    outer._trainer, model = _toy_trainer()
    model.poison = True
    with EventStorage(5000):
        outer.iter = outer.start_iter = 5000
        with pytest.raises(FloatingPointError, match=r"iteration=5000: .*first iteration"):
            outer.run_step()
        outer.iter = 5001
        with pytest.raises(FloatingPointError, match=r"iteration=5001: .*learning rate"):
            outer.run_step()


def test_eval_mode_forwards_are_not_checked():
    trainer, model = _toy_trainer()
    model.poison = True
    model.eval()
    out = model(torch.ones(3))  # the hook only looks at training-mode loss dicts
    assert not torch.isfinite(out["loss_a"])


def test_trainer_loads_state_without_optimizer(tiny_dataset, tmp_path, caplog):
    # A checkpoint written by detectron2 v0.6's DefaultTrainer has no "_trainer": main's
    # DefaultTrainer.load_state_dict raised KeyError on it.
    trainer = Trainer(tiny_cfg(output_dir=str(tmp_path)))
    with caplog.at_level(logging.WARNING, logger="disalign_det.engine.loop"):
        trainer.load_state_dict({"iteration": 4})
    assert trainer.iter == 4
    assert "no optimizer state" in caplog.text


def test_trainer_state_round_trips(tiny_dataset, tmp_path):
    cfg = tiny_cfg(output_dir=str(tmp_path / "a"), opts=["SOLVER.MAX_ITER", "2"])
    first = Trainer(cfg)
    first.train()
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["iteration"] == first.iter and "optimizer" in state["_trainer"]

    second = Trainer(tiny_cfg(output_dir=str(tmp_path / "b"), opts=["SOLVER.MAX_ITER", "2"]))
    second.load_state_dict(state)
    assert second.iter == first.iter
    assert second.scheduler.last_epoch == first.scheduler.last_epoch
    a, b = first.optimizer.state_dict(), second.optimizer.state_dict()
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for k in a["state"]:
        assert torch.equal(a["state"][k]["momentum_buffer"], b["state"][k]["momentum_buffer"])


class _MemoryHandler(PathHandler):
    """An iopath backend for ``mem://`` paths, kept in a dict (stands for a remote store)."""

    def __init__(self, tmp_dir):
        super().__init__()
        self.files = {}
        self.tmp_dir = tmp_dir

    def _get_supported_prefixes(self):
        return ["mem://"]

    def _open(self, path, mode="r", **kwargs):
        handler = self

        class _Writer(io.BytesIO if "b" in mode else io.StringIO):
            def close(self):
                handler.files[path] = self.getvalue()
                super().close()

        if "w" in mode:
            return _Writer()
        data = self.files[path]
        return io.BytesIO(data) if "b" in mode else io.StringIO(data)

    def _exists(self, path, **kwargs):
        return path in self.files

    def _isfile(self, path, **kwargs):
        return path in self.files

    def _get_local_path(self, path, **kwargs):
        local = os.path.join(self.tmp_dir, path[len("mem://") :].replace("/", "_"))
        with open(local, "wb") as f:
            f.write(self.files[path])
        return local


def test_checkpoints_are_saved_through_the_path_manager(tmp_path):
    handler = _MemoryHandler(str(tmp_path))
    pm = PathManager()
    pm.register_handler(handler)
    model = torch.nn.Linear(3, 2)
    ckpt = DisAlignCheckpointer(model, "mem://bucket/out")
    ckpt.path_manager = pm
    ckpt.save("model_0000001", iteration=1)
    assert set(handler.files) == {
        "mem://bucket/out/model_0000001.pth",
        "mem://bucket/out/last_checkpoint",
    }
    assert handler.files["mem://bucket/out/last_checkpoint"] == "model_0000001.pth"
    assert not os.path.exists("mem:")  # nothing written to a local folder of that name

    restored = torch.nn.Linear(3, 2)
    loader = DisAlignCheckpointer(restored, "mem://bucket/out")
    loader.path_manager = pm
    extra = loader.resume_or_load("", resume=True)
    assert extra["iteration"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v), k


def test_local_saves_stay_atomic(tmp_path, monkeypatch):
    # Plain and file:// paths resolve to the local disk: written through a temporary file.
    model = torch.nn.Linear(3, 2)
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((a, b)), real_replace(a, b)))
    DisAlignCheckpointer(model, f"file://{tmp_path}").save("m")
    assert [os.path.basename(b) for _, b in renames] == ["m.pth", "last_checkpoint"]
    assert all(".tmp." in a for a, _ in renames)
    assert (tmp_path / "last_checkpoint").read_text() == "m.pth"


def test_launch_on_cpu_uses_detectron2s_launch_where_it_can(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(launch_module, "d2_launch", lambda *a, **k: calls.append(("d2", a, k)))
    monkeypatch.setattr(launch_module.mp, "spawn", lambda *a, **k: calls.append(("ours", a, k)))
    launch_module.launch(print, 2, args=("x",))
    assert len(calls) == 1
    if features.launch_supports_cpu():  # detectron2 main: gloo on CPU in its own workers
        kind, args, kwargs = calls[0]
        assert kind == "d2" and args[1] == 2 and kwargs["dist_url"] == "auto"
    else:  # v0.6 asserts CUDA in its workers
        assert calls[0][0] == "ours" and calls[0][2]["nprocs"] == 2


def _report_rank(out_dir):
    from detectron2.utils import comm

    with open(os.path.join(out_dir, f"rank{comm.get_rank()}"), "w") as f:
        f.write(f"{comm.get_world_size()} {comm.get_local_rank()} {comm.get_local_size()}")


@pytest.mark.slow
def test_launch_two_cpu_processes(tmp_path):
    launch_module.launch(_report_rank, 2, dist_url="auto", args=(str(tmp_path),))
    assert sorted(os.listdir(tmp_path)) == ["rank0", "rank1"]
    assert (tmp_path / "rank0").read_text() == "2 0 2"
    assert (tmp_path / "rank1").read_text() == "2 1 2"


class _StochasticToy(torch.nn.Module):
    """A BatchNorm, a dropout and a drop-path-like layer before DisAlign's calibration parameter:
    stage-two freezing must keep all three in eval mode, on both entry points."""

    def __init__(self, cfg=None):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(4)
        self.drop = torch.nn.Dropout(0.5)
        self.path = DropPath()
        self.logit_scale = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.path(self.drop(self.bn(x))) * self.logit_scale


class DropPath(torch.nn.Module):
    # Named as timm's stochastic depth (recognised by its class name): drops everything in training.
    def forward(self, x):
        return x * 0 if self.training else x


def _check_frozen_stochastic_layers(model):
    model.train()
    x = torch.randn(8, 4)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b) and a.abs().sum() > 0  # no dropout, no dropped path
    assert not model.bn.training and not model.drop.training and not model.path.training
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["logit_scale"]


def test_freezing_is_the_same_on_both_entry_points():
    from detectron2.config import LazyCall as L
    from detectron2.modeling import META_ARCH_REGISTRY
    from omegaconf import OmegaConf

    from disalign_det.lazy import build_stage_two_model

    if "_StochasticToy" not in META_ARCH_REGISTRY:
        META_ARCH_REGISTRY.register(_StochasticToy)
    cfg = tiny_cfg(opts=["MODEL.META_ARCHITECTURE", "_StochasticToy"])
    cfg.MODEL.DISALIGN.FREEZE = "all_but_calibration"
    _check_frozen_stochastic_layers(Trainer.build_model(cfg))
    lazy = OmegaConf.create(
        {"model": L(_StochasticToy)(), "train": {"device": "cpu"}, "disalign": {}}
    )
    lazy.disalign.freeze = "all_but_calibration"
    _check_frozen_stochastic_layers(build_stage_two_model(lazy))
    # Stage one ("none"): nothing frozen, dropout active.
    lazy.disalign.freeze = "none"
    model = build_stage_two_model(lazy).train()
    assert model.drop.training and model.bn.training
